"""Resuming a run from its workdir: the newest checkpoint that reads back whole and is this
run's model. Unfinished saves are removed, unreadable steps set aside (renamed, not deleted) with
a warning, and a workdir of another model or text refused in one line that lists what differs.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from lstm_jax import distributed
from lstm_jax.checkpoint import Checkpoints, checkpoint_dir
from lstm_jax.config import complete_settings
from lstm_jax.data import vocab_difference
from lstm_jax.errors import UserError


def open_checkpoints(
    workdir: epath.Path, *, keep: int, restart: bool, log, room_needed: int = 0, members: int = 1
) -> Checkpoints:
    """The run's checkpoints; with `restart`, the old ones are first renamed out of the way."""
    if restart:
        directory = checkpoint_dir(workdir)
        if directory.exists() and jax.process_index() == 0:
            aside = directory.with_name(f"checkpoints.discarded-{time.strftime('%Y%m%d-%H%M%S')}")
            directory.rename(aside)
            log(f"--restart: moved the old checkpoints to {aside}.")
        # No process may list the folder before process 0 has moved it.
        distributed.barrier("lstm_jax.restart")
    return Checkpoints(workdir, keep=keep, room_needed=room_needed, members=members)


def resume_state(
    checkpoints: Checkpoints,
    config: Any,
    model: Any,
    state: Any,
    data: Any,
    devices: list,
    members: int | None = None,
) -> tuple[Any, Any, dict[str, Any] | None]:
    """The train state (on `devices`) and carry (this process's rows of it, on the host) to start
    from, and the metadata of the checkpoint they come from: the newest usable one, or a fresh
    start (meta None).

    Restore targets fit this run's devices, whatever the saving run had: the state is replicated
    over every device of the job, the carry is the whole global batch, on the host.
    """
    from lstm_jax import parallel

    whole_carry = model.initialize_carry(config.data.global_batch)
    rows: Any = data.rows
    if members is not None:  # A population's: [members, global_batch, ...].
        whole_carry = jax.tree.map(lambda c: np.stack([np.asarray(c)] * members), whole_carry)
        rows = (slice(None), data.rows)
    abstract_carry = jax.tree.map(lambda c: np.zeros(c.shape, c.dtype), whole_carry)
    resumed = restore_latest_usable(
        checkpoints,
        state,
        parallel.global_replicated_sharding(devices),
        abstract_carry,
        config.run_settings(),
        data.vocab.chars,
    )
    if resumed is None:
        return state, jax.tree.map(lambda c: np.asarray(c)[rows], whole_carry), None
    step, restored_state, restored_carry, meta = resumed
    state = parallel.to_host_local(restored_state, devices)
    carry = jax.tree.map(lambda c: np.asarray(c)[rows], restored_carry)
    return state, carry, {**meta, "step": step}


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
