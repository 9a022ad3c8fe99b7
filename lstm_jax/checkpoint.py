"""Checkpoints: a small layer over an Orbax `CheckpointManager` in `WORKDIR/checkpoints`, and
resuming from them (the newest usable step; damaged ones set aside; other settings refused).

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

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from lstm_jax import distributed
from lstm_jax.config import complete_settings
from lstm_jax.data import Vocab, vocab_difference
from lstm_jax.errors import UserError
from lstm_jax.models import CharLSTM, init_params, model_from_settings

ITEMS = ("state", "carry", "meta")
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
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS + LEGACY_ITEMS, options=options
        )

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

    def restore_model_params(self, step: int, abstract_params: Any) -> tuple[Any, str]:
        """The parameters that are the checkpoint's model: the raw ones, or their moving
        average where that was better on validation (the metadata's "selected"); and which."""
        which = self.read_meta(step).get("selected", "params")
        return self.restore_params(step, abstract_params, which), which

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
        """Start an asynchronous save; `wait()` before reading it back or exiting."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
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


# --- Resuming --------------------------------------------------------------------------------


def open_checkpoints(workdir: epath.Path, *, keep: int, restart: bool, log) -> Checkpoints:
    """The run's checkpoints; with `restart`, the old ones are first renamed out of the way."""
    if restart:
        directory = checkpoint_dir(workdir)
        if directory.exists() and jax.process_index() == 0:
            aside = directory.with_name(f"checkpoints.discarded-{time.strftime('%Y%m%d-%H%M%S')}")
            directory.rename(aside)
            log(f"--restart: moved the old checkpoints to {aside}.")
        # No process may list the folder before process 0 has moved it.
        distributed.barrier("lstm_jax.restart")
    return Checkpoints(workdir, keep=keep)


def settings_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k} {saved.get(k)!r} (saved) vs {current.get(k)!r} (now)"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def restore_latest_usable(
    checkpoints: Checkpoints,
    state: Any,
    sharding: jax.sharding.Sharding,
    abstract_carry: Any,
    settings: dict[str, Any],
    vocab_chars: str,
) -> tuple[int, Any, Any, dict[str, Any]] | None:
    """(step, state, carry, meta) of the newest checkpoint that reads back whole, after checking
    it is this run's model; None when there is none.

    Unfinished saves are removed with a warning; a checkpoint that fails to read (truncated or
    missing files) is set aside with a warning and the next older one is tried.
    """
    for folder in checkpoints.incomplete():
        logging.warning(
            "Removing the unfinished save %s (the process died while writing it).", folder
        )
        if jax.process_index() == 0:
            folder.rmtree(missing_ok=True)
    steps = sorted(checkpoints.steps(), reverse=True)
    for step in steps:
        try:
            meta = checkpoints.read_meta(step)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not usable.
            _skip_unreadable(checkpoints, step, e)
            continue
        differences = settings_mismatch(complete_settings(meta["settings"]), settings)
        if meta["vocab"] != vocab_chars:
            differences.append(
                f"vocabulary differs ({vocab_difference(meta['vocab'], vocab_chars)})"
            )
        if differences:
            raise UserError(
                f"{checkpoints.directory.parent} holds a run with other settings: "
                f"{'; '.join(differences)}. Use a new --workdir, or --restart to set the old "
                "checkpoints aside."
            )
        try:
            return (step, *checkpoints.restore(step, state, sharding, abstract_carry), meta)
        except Exception as e:  # noqa: BLE001
            if "structures do not match" in str(e):  # Not damage: another model's tree.
                raise UserError(
                    f"Checkpoint {checkpoints.directory}/{step} holds parameters or optimizer "
                    "state of another shape; use a new --workdir, or --restart to set it aside."
                ) from None
            _skip_unreadable(checkpoints, step, e)
    if steps:
        raise UserError(
            f"No checkpoint in {checkpoints.directory} could be read (steps {steps} were set "
            "aside); pass --restart to train from scratch."
        )
    return None


def _skip_unreadable(checkpoints: Checkpoints, step: int, error: Exception) -> None:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    aside = checkpoints.set_aside(step) if jax.process_index() == 0 else None
    logging.warning(
        "Checkpoint %s/%d is unreadable (%s); moved it to %s and trying an older one.",
        checkpoints.directory,
        step,
        reason,
        aside,
    )


def _fields_before_ema(state: Any) -> dict[str, Any]:
    """The train state's fields as they were saved before `ema_params` existed."""
    return {name: getattr(state, name) for name in ("step", "params", "opt_state", "dropout_key")}


# --- Reading a model -------------------------------------------------------------------------


def restore_model(
    workdir: str | os.PathLike, checkpoint: str = "best"
) -> tuple[CharLSTM, Any, Vocab, int, dict[str, Any]]:
    """(model, parameters on the first local device, vocabulary, step, meta) of a checkpoint:
    'best', 'latest' or a step number. A `UserError` says what is wrong or what exists."""
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        step = checkpoints.resolve(str(checkpoint))
        meta = checkpoints.read_meta(step)
        vocab = Vocab(meta["vocab"])
        model = model_from_settings(meta["settings"], vocab.size)
        abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params, _ = checkpoints.restore_model_params(step, abstract_like(abstract, sharding))
    finally:
        checkpoints.close()
    return model, params, vocab, step, meta
