"""Checkpoints: a small layer over an Orbax `CheckpointManager` in `WORKDIR/checkpoints` (resuming
a run from them is `lstm_jax.resume`).

Each step holds three items: `state`, the whole `TrainState` (step, parameters, optimizer state,
dropout key, and whatever fields it gains) restored into an abstract state of the current run;
`carry` (the recurrent state carried between batches, as [global_batch, ...] arrays so it does
not depend on the device count); and `meta`, a JSON document with the vocabulary, the run
settings, the validation loss and the loop's bookkeeping. The sampler restores only the
parameters and `meta`. Nothing is unpickled.

Checkpoints written before the state was one item hold `params` and `opt_state` instead; they
restore into the same `TrainState`, with the dropout key the run's seed gives (as it did then).

A workdir may be local or on `gs://` (Orbax writes arrays there through tensorstore; folders
go through `etils.epath`, which needs `gcsfs`). In a multi-process job every process calls
`save`/`restore` with global arrays, and Orbax decides which process writes what.

Kept: the latest `keep` steps plus the best by validation loss.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from lstm_jax.errors import NoCheckpoint, UserError, argument, reason

ITEMS = ("state", "carry", "meta")
META_KEYS = ("vocab", "settings")  # What every reader of a checkpoint's metadata needs.
LEGACY_ITEMS = ("params", "opt_state")  # The state, as checkpoints before 2026-11 held it.


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """The run folder as a path that also works for `gs://...` (epath, as Orbax uses)."""
    if "://" in str(workdir):
        return epath.Path(workdir)
    return epath.Path(Path(workdir).expanduser().absolute())


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return workdir_path(workdir) / "checkpoints"


class Checkpoints:
    """The checkpoints of one workdir, for training (read-write) or sampling (read-only)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 2,
        read_only: bool = False,
        room_needed: int = 0,
        members: int = 1,
    ):
        """room_needed: bytes a save needs (`room_needed(state)`); on a local disk with less
        free, a save stops the run before it starts (a save that runs out of space midway
        fails in Orbax's background threads, noisily). members: a population's size, whose
        every member's best step is kept too."""
        self.directory = checkpoint_dir(workdir)
        self.room_needed = room_needed
        best_by_val = [policies.BestN(
            get_metric_fn=lambda metrics: metrics["val_loss"], reverse=True, n=1
        )] + [policies.BestN(
            get_metric_fn=functools.partial(_member_metric, k), reverse=True, n=1
        ) for k in range(members if members > 1 else 0)]  # fmt: skip
        # "Read-only" here means: never create the folder. Orbax's own read_only mode logs
        # warnings on every open, and nothing is saved unless `save` is called anyway.
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            best_fn=lambda metrics: metrics["val_loss"],
            best_mode="min",
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(keep), *best_by_val]
            ),
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS + LEGACY_ITEMS, options=options
        )
        self._save_error: UserError | None = None
        self._partial = self._find_partial_steps(read_only)

    # --- Reading ---

    def steps(self) -> list[int]:
        return [step for step in self._manager.all_steps() if step not in self._partial]

    def latest_step(self) -> int | None:
        return max(self.steps(), default=None)

    def best_step(self, member: int | None = None) -> int | None:
        """The best step by validation: of the run, or of a population's `member`."""
        if member is not None:  # The step whose model is that member's best.
            return min(self.steps(), key=lambda s: self._selected_val_loss(s, member), default=None)
        best = self._manager.best_step()
        if best in self._partial:  # Orbax does not know it is incomplete: pick among the rest.
            best = min(self.steps(), key=self._selected_val_loss, default=None)
        return best

    def _selected_val_loss(self, step: int, member: int | None = None) -> float:
        try:
            meta = self.read_meta(step)
        except UnreadableCheckpoint:
            return math.inf
        if member is not None:
            return meta["members"][member]["selected_val_loss"]
        return meta.get("selected_val_loss", meta.get("val_loss", math.inf))

    def _find_partial_steps(self, read_only: bool) -> set[int]:
        """Steps whose folder lacks some of its items: a process killed while Orbax deleted an
        old step leaves part of it. Training moves them aside; readers skip them. Both warn."""
        partial = set()
        for step in self._manager.all_steps():
            folder = self.directory / str(step)
            whole = (folder / "meta" / "metadata").exists() and (
                all((folder / item / "_METADATA").exists() for item in ("state", "carry"))
                or all((folder / item / "_METADATA").exists() for item in LEGACY_ITEMS)
            )
            if whole:
                continue
            if read_only or jax.process_index() != 0:
                logging.warning("Skipping checkpoint %s: some of its files are missing.", folder)
                partial.add(step)
            else:
                aside = self.set_aside(step)
                logging.warning(
                    "Checkpoint %s is incomplete (some of its files are missing, as when a run "
                    "is killed while an old step is deleted); moved it to %s.",
                    folder,
                    aside,
                )
        return partial

    def resolve(self, which: str) -> int:
        """'latest', 'best' or a step number -> a saved step; a `UserError` lists what exists."""
        steps = self.steps()
        if not steps:
            raise NoCheckpoint(
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
            f"{argument('checkpoint', which)} is not in {self.directory}; use latest, best or "
            f"one of the saved steps {steps}."
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
        try:
            (self.directory / str(step)).rename(aside)
        except OSError as e:
            raise UserError(
                f"Checkpoint {self.directory}/{step} is unreadable and cannot be moved aside "
                f"({reason(e)}); fix the folder's permissions or move it away yourself."
            ) from None
        self._manager.reload()
        return aside

    def read_meta(self, step: int) -> dict[str, Any]:
        """The step's metadata; an `UnreadableCheckpoint` if it is not whole, valid JSON with the
        keys every reader needs."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            meta = restored["meta"]
        except Exception as e:  # noqa: BLE001 - missing, torn or invalid: all unreadable.
            raise UnreadableCheckpoint(self, step, f"{type(e).__name__}") from None
        missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
        if missing:
            raise UnreadableCheckpoint(self, step, f"no {', '.join(missing)} in its metadata")
        return meta

    def _is_legacy(self, step: int) -> bool:
        return not (self.directory / str(step) / "state").exists()

    def _has_ema_field(self, step: int) -> bool:
        """Whether the saved train state has the `ema_params` field (None or not): those saved
        before it existed lack it."""
        metadata = json.loads((self.directory / str(step) / "state" / "_METADATA").read_text())
        return any(key.startswith("('ema_params'") for key in metadata["tree_metadata"])

    def restore_params(self, step: int, abstract_params: Any, which: str = "params") -> Any:
        """Only the parameters, into the shapes and shardings of `abstract_params`: the state's
        `params`, or with which="ema_params" their moving average."""
        if self._is_legacy(step):
            restored = self._manager.restore(
                step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
            )
            return restored["params"]
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_params
        )
        restored = ocp.PyTreeCheckpointer().restore(
            (self.directory / str(step) / "state").as_posix(),
            args=ocp.args.PyTreeRestore(
                item={which: abstract_params},
                restore_args={which: restore_args},
                partial_restore=True,
            ),
        )
        return restored[which]

    def restore_model_params(
        self, step: int, abstract_params: Any, member: int | None = None
    ) -> tuple[Any, str]:
        """The parameters that are the checkpoint's model: the raw ones, or their moving
        average where that was better on validation (the metadata's "selected"); and which.
        For a population's `member`, `abstract_params` is the stacked tree, and the member's
        own are returned."""
        meta = self.read_meta(step)
        if member is None:
            which = meta.get("selected", "params")
            return self.restore_params(step, abstract_params, which), which
        which = meta["members"][member]["selected"]
        stacked = self.restore_params(step, abstract_params, which)
        return jax.tree.map(lambda x: x[member], stacked), which

    def restore(
        self, step: int, state: Any, sharding: jax.sharding.Sharding, abstract_carry: Any
    ) -> tuple[Any, Any]:
        """The train state and carry of `step`, shaped like `state` (a fresh train state, whose
        values only fill what old checkpoints lack) and placed with `sharding`."""
        abstract = abstract_like(state, sharding)
        if not self._is_legacy(step):
            before_ema = state.ema_params is None and not self._has_ema_field(step)
            target = _fields_before_ema(abstract) if before_ema else abstract
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    carry=ocp.args.StandardRestore(abstract_carry),
                ),
            )
            saved_state = restored["state"]
            if before_ema:
                saved_state = abstract.replace(**saved_state)
            return saved_state, restored["carry"]
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                opt_state=ocp.args.StandardRestore(abstract.opt_state),
                carry=ocp.args.StandardRestore(abstract_carry),
            ),
        )
        # Old checkpoints did not save the dropout key: it came from the seed, as it does now.
        restored_state = abstract.replace(
            step=jax.device_put(np.asarray(step, np.int32), sharding),
            params=restored["params"],
            opt_state=restored["opt_state"],
            dropout_key=jax.device_put(np.asarray(state.dropout_key), sharding),
        )
        return restored_state, restored["carry"]

    # --- Writing ---

    def save(
        self, step: int, *, state: Any, carry: Any, meta: dict[str, Any], val_loss: float
    ) -> None:
        """Start an asynchronous save; `wait()` before reading it back or exiting. A
        `SaveFailed` if this or the previous save failed, or the disk has no room for it. A
        population's members (meta["members"]) each keep their best by their own loss."""
        if self.room_needed and "://" not in str(self.directory):
            free = shutil.disk_usage(self.directory).free
            if free < self.room_needed and self._save_error is None:
                self._save_error = SaveFailed(
                    self, f"{free / 2**20:,.1f} MiB free, {self.room_needed / 2**20:,.1f} needed"
                )
        with self._saving():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    carry=ocp.args.StandardSave(carry),
                    meta=ocp.args.JsonSave(meta),
                ),
                metrics={"val_loss": float(val_loss)} | {
                    f"val_loss_{k}": float(m["selected_val_loss"])
                    for k, m in enumerate(meta.get("members", []))
                },
                force=True,
            )

    def next_resume(self) -> str:
        """Where a run started now would begin: the newest save that finished."""
        steps = committed_steps(self.directory)
        return f"the next run {f'resumes from step {steps[-1]}' if steps else 'starts afresh'}"

    def check_saves(self) -> None:
        """A `SaveFailed` if a background save has failed since the last check; cheap enough for
        every step, so a failed save stops the run at the next step, not at the next save."""
        with self._saving():
            # Orbax's check also waits for the save's metadata: only ask once the save is done.
            if not self._manager.is_saving_in_progress():
                self._manager.check_for_errors()

    def wait(self) -> None:
        with self._saving():
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._save_error is None:  # After a failure Orbax would re-raise it, or wait on it.
            self._manager.close()

    @contextlib.contextmanager
    def _saving(self):
        """Turn a failed save (raised by Orbax at this call or the next) into one `SaveFailed`."""
        if self._save_error is not None:
            raise self._save_error
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any failure to write stops the run the same way.
            self._save_error = SaveFailed(self, e)
            raise self._save_error from None


class UnreadableCheckpoint(UserError):
    """A step whose metadata cannot be read (torn, edited, incomplete)."""

    def __init__(self, checkpoints: Checkpoints, step: int, why: str):
        super().__init__(
            f"Checkpoint {checkpoints.directory}/{step} is unreadable ({why}); pick another with "
            f"{argument('checkpoint')} (saved steps: {checkpoints.steps()})."
        )


class SaveFailed(UserError):
    """A checkpoint could not be written: the run stops, naming the last safe step."""

    def __init__(self, checkpoints: Checkpoints, error: Exception | str):
        safe = committed_steps(checkpoints.directory)
        last_safe = f"step {safe[-1]}" if safe else "none (nothing was saved yet)"
        why = error if isinstance(error, str) else reason(error)
        super().__init__(
            f"Saving a checkpoint in {checkpoints.directory} failed ({why}); the last "
            f"safe checkpoint is {last_safe}. Fix the folder (free space, permissions) and run "
            "the same command again to resume from it."
        )


def _member_metric(member: int, metrics: dict[str, float]) -> float:
    return metrics.get(f"val_loss_{member}", math.inf)


def room_needed(state: Any) -> int:
    """Bytes to keep free for one checkpoint of `state` (with the carry and metadata): its
    arrays plus a quarter and a MiB for the files' blocks and metadata (measured: a 0.3 MB
    state takes 0.44 MB on ext4; large states take little more than their arrays)."""
    arrays = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
    return int(arrays * 1.25) + 2**20


def committed_steps(directory: epath.Path) -> list[int]:
    """The steps whose save finished, as the folder shows them (Orbax writes a step under a
    temporary name and renames it when it is whole)."""
    try:
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    except OSError:
        return []


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Shapes and dtypes of `tree`, placed with `sharding`: the target for a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _fields_before_ema(state: Any) -> dict[str, Any]:
    """The train state's fields as they were saved before `ema_params` existed."""
    return {name: getattr(state, name) for name in ("step", "params", "opt_state", "dropout_key")}
