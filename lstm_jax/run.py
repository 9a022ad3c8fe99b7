"""What the training loop's sections share (`Run`: settings, data, the live state, its outputs,
and a population's members and layout) and what a run hands back (`TrainResult`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from lstm_jax import parallel, population
from lstm_jax.bookkeeping import Progress
from lstm_jax.config import Config
from lstm_jax.data import RunData, Vocab
from lstm_jax.metrics import MetricsFile, Timer
from lstm_jax.workdir import Claim


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run hands back: for tests, notebooks and the command line."""

    step: int
    params: Any  # On the host, as numpy arrays.
    val_loss: float
    best_val_loss: float
    best_step: int
    test_loss: float  # Of the best checkpoint; NaN without a test part or a finished run.
    train_losses: list[float]  # Mean loss (nats) of every logging window, in order.
    vocab: Vocab
    stopped_early: bool = False
    # results.json's member rows: seed, grid settings, best step, val and test bpc. A
    # population's `params` and losses above are stacked / of its best member by validation.
    members: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Run:
    """Everything the loop's sections share: settings, data, the live state and its outputs."""

    config: Config
    devices: list[jax.Device]
    data: RunData
    model: Any
    state: Any
    carry: Any
    progress: Progress
    timer: Timer
    checkpoints: Any
    metrics_file: MetricsFile = None
    held: Claim = None
    num_steps: int = 0
    log: Callable[[str], None] = logging.info
    train_losses: list[float] = dataclasses.field(default_factory=list)
    # A population's (None for a single run): its members, their batchers, their traced
    # settings on the devices, how they map over the devices, and each member's bookkeeping.
    members: list[population.Member] | None = None
    batchers: list[Any] | None = None
    hparams: Any = None
    layout: parallel.PopulationLayout | None = None
    member_progress: list[Progress] | None = None

    def shard(self, x: np.ndarray) -> np.ndarray:
        if self.layout is not None:
            return self.layout.rows(x)
        return parallel.shard(x, len(self.devices))

    def batch(self, step: int) -> np.ndarray:
        if self.layout is None:
            return self.shard(self.data.batcher.batch(step, self.data.rows))
        rows = np.stack([b.batch(step, self.data.rows) for b in self.batchers])
        return self.layout.to_devices(rows)

    def carry_to_devices(self, carry: Any) -> Any:
        """The carry (this process's rows, [members, rows, ...] for a population) laid out."""
        to_devices = self.layout.to_devices if self.layout is not None else self.shard
        return jax.tree.map(lambda c: to_devices(np.asarray(c)), carry)

    def carry_to_host(self) -> Any:
        to_host = self.layout.to_host if self.layout is not None else parallel.unshard
        return jax.tree.map(to_host, self.carry)

    def result(self, step: int, stopped_by: str | None, rows: list[dict]) -> TrainResult:
        """The run's `TrainResult` (a population's: its best member's numbers by validation,
        its parameters [members, ...] whatever the layout)."""
        params, progress = jax.device_get(self.state.params), self.progress
        if self.layout is not None:
            progress = self.member_progress[population.best_member(self.member_progress)]
            params = self.layout.state_to_host(params)
        return TrainResult(
            step=step,
            params=params,
            val_loss=progress.val_loss,
            best_val_loss=progress.best_val_loss,
            best_step=progress.best_step,
            test_loss=progress.test_loss,
            train_losses=self.train_losses,
            vocab=self.data.vocab,
            stopped_early=stopped_by is not None,
            members=rows,
        )
