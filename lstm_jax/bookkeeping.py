"""A run's bookkeeping, and each population member's: best validation, which parameters are the
checkpoint's model, test score, and the rows of results.json.

`Progress` is what every checkpoint's metadata saves of the loop. A single run has one; a
population (`lstm_jax.population`) one per member, kept exactly as the member's own single run
would keep it. The functions below are the training loop's (`lstm_jax.train`) population side:
they take its `lstm_jax.run.Run` and write the members' numbers to its log, metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lstm_jax import population
from lstm_jax.evaluate import test_best_checkpoint
from lstm_jax.metrics import summarise
from lstm_jax.steps import bits_per_char


@dataclasses.dataclass
class Progress:
    """The loop's bookkeeping, saved in every checkpoint's metadata."""

    best_val_loss: float = math.inf
    best_step: int = -1
    best_params: str = "params"  # Which of the state's parameters: "params" or "ema_params".
    val_loss: float = math.nan  # The raw parameters'.
    ema_val_loss: float = math.nan
    test_loss: float = math.nan

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Progress:
        """The bookkeeping a checkpoint's metadata (or a member's entry in it) saved."""
        return cls(meta["best_val_loss"], meta["best_step"], meta.get("best_params", "params"))

    def record(self, losses: dict[str, float], step: int) -> None:
        """A validation at `step`: {"params": loss, "ema_params": loss (with an EMA)}."""
        self.val_loss = losses["params"]
        self.ema_val_loss = losses.get("ema_params", math.nan)
        selected = min(losses, key=losses.get)
        if losses[selected] < self.best_val_loss:
            self.best_val_loss, self.best_step = losses[selected], step
            self.best_params = selected

    def selected(self) -> tuple[str, float]:
        """A checkpoint's model: its raw parameters, or their average where that is better."""
        if self.ema_val_loss < self.val_loss:  # False without an EMA (NaN).
            return "ema_params", self.ema_val_loss
        return "params", self.val_loss


def with_hparams(step: Callable, hparams: Any, state, batch, carry, reset):
    """A population's step, called as a single run's is."""
    return step(state, batch, carry, reset, hparams)


def summarise_training(run: Any, fetched: list) -> tuple[dict[str, Any], str]:
    """The training metrics since the last flush (`metrics.summarise`); a population's: the
    members' mean (each member's loss under "member_losses"), and ' of member K ...' naming the
    first that diverged ('' for none, and for a single run)."""
    if run.layout is None:
        return summarise(fetched), ""
    per_member = [
        summarise([{k: np.asarray(v).reshape(-1)[i] for k, v in m.items()} for m in fetched])
        for i in range(len(run.members))
    ]
    train = {k: float(np.mean([m[k] for m in per_member])) for k in per_member[0]}
    train["member_losses"] = [m["loss"] for m in per_member]
    diverged = [i for i, m in enumerate(per_member) if not math.isfinite(m["loss"])]
    return train, f" of {run.members[diverged[0]].label()}" if diverged else ""


def record_member_validation(run: Any, step: int, losses: dict[str, np.ndarray]) -> None:
    """Each member's validation, bookkept as a single run's is; the log says the spread."""
    for i, progress in enumerate(run.member_progress):
        progress.record({name: float(member[i]) for name, member in losses.items()}, step)
    best = population.best_member(run.member_progress)
    run.progress = run.member_progress[best]
    val_bpc = [bits_per_char(p.val_loss) for p in run.member_progress]
    run.log(
        f"step {step}: validation {np.mean(val_bpc):.4f} bpc, mean of {len(val_bpc)} members "
        f"({min(val_bpc):.4f} to {max(val_bpc):.4f}); best {run.members[best].label()}: "
        f"{bits_per_char(run.progress.best_val_loss):.4f} bpc at step {run.progress.best_step}"
    )
    records = {}
    if "ema_params" in losses:
        records["member_ema_val_bpc"] = [bits_per_char(p.ema_val_loss) for p in run.member_progress]
    run.metrics_file.write(
        step=step,
        wall_seconds=run.timer.wall_seconds(),
        train_seconds=run.timer.train_seconds,
        val_loss=float(np.mean([p.val_loss for p in run.member_progress])),
        val_bpc=float(np.mean(val_bpc)),
        member_val_bpc=val_bpc,
        **records,
    )


def member_checkpoint_meta(run: Any) -> list[dict[str, Any]]:
    """Every member's bookkeeping for a checkpoint's metadata; its "selected_val_loss" (the
    member's model's validation there) keeps each member's best checkpoint."""
    rows = []
    for member, progress in zip(run.members, run.member_progress, strict=True):
        which, loss = progress.selected()
        rows.append({
            "seed": member.seed,
            "settings": member.settings,
            **dataclasses.asdict(progress),
            "selected": which,
            "selected_val_loss": loss,
        })  # fmt: skip
    return rows


def record_member_tests(run: Any) -> None:
    """Each member's best checkpoint (by its own validation) scored on the test text."""
    stacked_like = run.layout.state_to_host(run.state.params)
    for i, progress in enumerate(run.member_progress):
        tested = test_best_checkpoint(
            run.checkpoints, run.model, stacked_like, run.data.split.test, member=i
        )
        if tested is None:
            return
        step, which, progress.test_loss = tested
        run.metrics_file.write(
            step=step, member=i, test_loss=progress.test_loss,
            test_bpc=bits_per_char(progress.test_loss), test_of=which,
        )  # fmt: skip
    best = population.best_member(run.member_progress)
    run.progress = run.member_progress[best]
    test_bpc = [bits_per_char(p.test_loss) for p in run.member_progress]
    run.log(
        f"Test: {np.mean(test_bpc):.4f} bpc, mean of {len(test_bpc)} members ({min(test_bpc):.4f} "
        f"to {max(test_bpc):.4f}), each member's best checkpoint by its validation, over the "
        f"{len(run.data.split.test) - 1:,} predicted test characters (all but the first) read "
        "as one stream."
    )


def best_member_params(run: Any) -> Any:
    """The parameters of the best member by validation so far, on the host."""
    best = population.best_member(run.member_progress)
    return jax.tree.map(lambda x: x[best], run.layout.state_to_host(run.state.params))


def write_results(run: Any) -> list[dict[str, Any]]:
    """WORKDIR/results.json: one row per member (a single run is a population of one); at the
    end of a population run, its groups as a table, mean +/- std over the seeds."""
    members = run.members or [population.Member(0, run.config.data.seed, {}, run.config)]
    progress = run.member_progress or [run.progress]
    rows = []
    for member, p in zip(members, progress, strict=True):
        rows.append({
            "member": member.index,
            "seed": member.seed,
            "settings": member.settings,
            "best_step": p.best_step if p.best_step >= 0 else None,
            "val_bpc": _finite_or_none(bits_per_char(p.best_val_loss)),
            "test_bpc": _finite_or_none(bits_per_char(p.test_loss)),
        })  # fmt: skip
    if jax.process_index() != 0:
        return rows
    results = population.write_results(run.held.path, rows)
    if run.members is not None:
        run.log(
            "Results (results.json), mean +/- std over seeds:\n"
            + population.groups_table(results["groups"])
        )
    return rows


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
