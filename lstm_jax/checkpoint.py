"""Checkpoints: a small layer over an Orbax `CheckpointManager` in `WORKDIR/checkpoints`.

Each step holds four items: `params`, `opt_state`, `carry` (the LSTM state carried between
batches, as [global_batch, hidden] arrays so it does not depend on the device count) and `meta`,
a JSON document with the vocabulary, the run settings, the validation loss and the loop's
bookkeeping. The sampler restores only `params` and `meta`. Nothing is unpickled.

A workdir may be local or on `gs://` (Orbax writes arrays there through tensorstore; folders
go through `etils.epath`, which needs `gcsfs`). In a multi-process job every process calls
`save`/`restore` with global arrays, and Orbax decides which process writes what.

Kept: the latest `keep` steps plus the best by validation loss.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from lstm_jax.errors import UserError

ITEMS = ("params", "opt_state", "carry", "meta")


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """The run folder as a path that also works for `gs://...` (epath, as Orbax uses)."""
    if "://" in str(workdir):
        return epath.Path(workdir)
    return epath.Path(Path(workdir).expanduser().absolute())


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return workdir_path(workdir) / "checkpoints"


class Checkpoints:
    """The checkpoints of one workdir, for training (read-write) or sampling (read-only)."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        best_by_val = policies.BestN(
            get_metric_fn=lambda metrics: metrics["val_loss"], reverse=True, n=1
        )
        # "Read-only" here means: never create the folder. Orbax's own read_only mode logs
        # warnings on every open, and nothing is saved unless `save` is called anyway.
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            best_fn=lambda metrics: metrics["val_loss"],
            best_mode="min",
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(keep), best_by_val]
            ),
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    # --- Reading ---

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def resolve(self, which: str) -> int:
        """'latest', 'best' or a step number -> a saved step; a `UserError` lists what exists."""
        steps = self.steps()
        if not steps:
            raise UserError(
                f"No checkpoint in {self.directory}; train first with "
                "python -m lstm_jax.main --workdir=... ."
            )
        if which == "latest":
            return self.latest_step()
        if which == "best":
            return self.best_step()
        if which.isdigit() and int(which) in steps:
            return int(which)
        raise UserError(
            f"--checkpoint={which} is not in {self.directory}; use latest, best or one of "
            f"the saved steps {steps}."
        )

    def incomplete(self) -> list[epath.Path]:
        """Folders of saves that never finished (the process died while writing them)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)

    def set_aside(self, step: int) -> epath.Path:
        """Move an unreadable step out of the way (renamed, not deleted) so training can go on."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.directory.with_name(f"checkpoints.unreadable-{step}-{stamp}")
        (self.directory / str(step)).rename(aside)
        self._manager.reload()
        return aside

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
        return restored["params"]

    def restore(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
        """Restore params, opt_state and carry into the shapes and shardings of `abstract`."""
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
        args["meta"] = ocp.args.JsonRestore()
        return dict(self._manager.restore(step, args=ocp.args.Composite(**args)))

    # --- Writing ---

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any,
        carry: Any,
        meta: dict[str, Any],
        val_loss: float,
    ) -> None:
        """Start an asynchronous save; `wait()` before reading it back or exiting."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                carry=ocp.args.StandardSave(carry),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics={"val_loss": float(val_loss)},
            force=True,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Shapes and dtypes of `tree`, placed with `sharding`: the target for a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
