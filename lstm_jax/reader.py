"""Reading a trained model out of a workdir: one checkpoint's model, parameters, vocabulary and
metadata (`restore_model`, what `sample`, `evaluate`, `export` and `lstm_jax.load` read), and in
a population's workdir one member's (`choose_member`: by index, by settings, or the best by
validation).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from lstm_jax.errors import NoCheckpoint, UserError, argument

if TYPE_CHECKING:
    from lstm_jax.data import Vocab
    from lstm_jax.models import CharLSTM

T = TypeVar("T")

# The readers' (sample, evaluate, export, info) choice of a population's member.
MEMBER_HELP = (
    "In a population's run folder (--seeds, --grid), the member: its index, or its settings "
    "such as learning_rate=0.004,seed=1 (the best by validation of those that have them); "
    "empty: the best member by validation."
)


def member_note(meta: dict[str, Any]) -> str:
    """', member K (seed S, settings)' for a population member's checkpoint metadata, else ''."""
    if "member" not in meta:
        return ""
    values = "".join(f", {k}={v}" for k, v in meta["member_settings"].items())
    return f", member {meta['member']} (seed {meta['seed']}{values})"


# How often a reader beside a live trainer starts again when the step it read was removed.
_READ_ATTEMPTS = 5


def restore_model(
    workdir: str | os.PathLike, checkpoint: str = "best", member: str | int = ""
) -> tuple[CharLSTM, Any, Vocab, int, dict[str, Any]]:
    """(model, parameters on the first local device, vocabulary, step, meta) of a checkpoint:
    'best', 'latest' or a step number. A `UserError` says what is wrong or what exists.

    In a population's workdir, the model is one member's (`member`: an index, grid settings
    such as 'learning_rate=0.004' or 'seed=1', or empty for the best member by validation);
    'best' is then that member's best step, and `meta` describes that member (`choose_member`).

    Read `beside_trainer`: a step removed by a running trainer meanwhile is never called
    unreadable.
    """

    def read(reading: list[int]) -> tuple[CharLSTM, Any, Vocab, int, dict[str, Any]]:
        return _restore_model(workdir, checkpoint, member, reading)

    return beside_trainer(workdir, str(checkpoint), read)


def beside_trainer(
    workdir: str | os.PathLike,
    checkpoint: str,
    read: Callable[[list[int]], T],
    pick: str | None = None,
) -> T:
    """`read(reading)`, which appends to `reading` each step it starts to read, tried again
    while a running trainer's retention policy removes what it reads.

    For 'latest' and 'best', the next try reads the trainer's newest whole step (or new best);
    an explicit step that was removed is said so in one line (`pick`: how the caller names a
    step, by default the checkpoint argument), never called unreadable.
    """
    for attempt in range(_READ_ATTEMPTS):
        reading: list[int] = []
        try:
            return read(reading)
        except (FileNotFoundError, NotADirectoryError):
            # A step deleted while Orbax listed the folder (it stats every step): list again.
            if attempt == _READ_ATTEMPTS - 1:
                raise
        except NoCheckpoint:
            # A listing taken while the trainer swapped its steps can look empty: look again,
            # unless the folder really has no whole step.
            if attempt == _READ_ATTEMPTS - 1 or not _has_steps(workdir):
                raise
        except UserError:
            if not reading or not removed(workdir, reading[-1]):
                raise
            if checkpoint not in ("best", "latest"):
                raise UserError(
                    f"Checkpoint step {reading[-1]} was removed by the running trainer while it "
                    f"was read (it keeps its newest steps and the best); pick a newer one with "
                    f"{pick or argument('checkpoint')} (python -m lstm_jax.info {workdir} lists "
                    "them), or latest."
                ) from None
    raise UserError(
        f"The checkpoints in {workdir} changed {_READ_ATTEMPTS} times while being read; try "
        "again, or let the trainer save less often (--checkpoint_every)."
    )


def _has_steps(workdir: str | os.PathLike) -> bool:
    from lstm_jax.checkpoint import checkpoint_dir, committed_steps

    return bool(committed_steps(checkpoint_dir(workdir)))


def removed(workdir: str | os.PathLike, step: int) -> bool:
    """Whether `step` is gone (or going: Orbax deletes a folder file by file) from `workdir`."""
    from lstm_jax.checkpoint import checkpoint_dir, committed_steps

    directory = checkpoint_dir(workdir)
    if step not in committed_steps(directory):
        return True
    time.sleep(0.5)  # A deletion under way finishes in milliseconds; a damaged step stays.
    return step not in committed_steps(directory)


def _restore_model(
    workdir: str | os.PathLike, checkpoint: str, member: str | int, reading: list[int]
) -> tuple[CharLSTM, Any, Vocab, int, dict[str, Any]]:
    """`restore_model`'s one attempt; appends the step it reads to `reading`."""
    # Imported here: the commands' --help (which reads MEMBER_HELP) needs no JAX.
    import jax

    from lstm_jax.checkpoint import Checkpoints, UnreadableCheckpoint, abstract_like
    from lstm_jax.data import Vocab
    from lstm_jax.models import init_params, model_from_settings

    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        checkpoints.resolve("latest")  # A clear error where there is no checkpoint.
        members = _population(checkpoints)
        index = choose_member(members, member, checkpoints.directory.parent)
        if index is not None and str(checkpoint) == "best":
            step = checkpoints.best_step(index)
        else:
            step = checkpoints.resolve(str(checkpoint))
        reading.append(step)
        meta = checkpoints.read_meta(step)
        try:
            vocab = Vocab(meta["vocab"])
            model = model_from_settings(meta["settings"], vocab.size)
            abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
            if index is not None:  # The population's parameters, stacked [members, ...].
                stacked = len(meta["members"])
                abstract = jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct((stacked, *x.shape), x.dtype), abstract
                )
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            params, _ = checkpoints.restore_model_params(
                step, abstract_like(abstract, sharding), index
            )
            if index is not None:
                meta = member_meta(meta, index)
        except Exception as e:  # noqa: BLE001 - edited metadata, truncated or missing arrays.
            raise UnreadableCheckpoint(checkpoints, step, type(e).__name__) from None
    finally:
        checkpoints.close()
    return model, params, vocab, step, meta


def population_size(workdir: str | os.PathLike) -> int | None:
    """How many members the population in `workdir` has; None for a single run's workdir. A
    `UserError` where there is no checkpoint."""
    from lstm_jax.checkpoint import Checkpoints

    def read(reading: list[int]) -> int | None:
        checkpoints = Checkpoints(workdir, read_only=True)
        try:
            checkpoints.resolve("latest")  # A clear error where there is no checkpoint.
            members = _population(checkpoints)
        finally:
            checkpoints.close()
        return None if members is None else len(members)

    return beside_trainer(workdir, "latest", read)


def _population(checkpoints: Any) -> list[dict[str, Any]] | None:
    """The members in the newest readable checkpoint's metadata; None for a single run."""
    from lstm_jax.checkpoint import UnreadableCheckpoint

    for step in sorted(checkpoints.steps(), reverse=True):
        try:
            return checkpoints.read_meta(step).get("members")
        except UnreadableCheckpoint:  # Damaged: said when it is the one asked for.
            continue
    return None


def choose_member(
    members: list[dict[str, Any]] | None, member: str | int, workdir: Any
) -> int | None:
    """The population member that `member` names (None for a single run's workdir): '' the best
    by validation; an index; or 'name=value,...' settings (grid values, `seed`), the best by
    validation among the members that have them. A `UserError` says what exists."""
    text = str(member).strip()
    if members is None:
        if text in ("", "0"):
            return None
        raise UserError(
            f"{workdir} is a single run (one member, 0), not a population; drop the member."
        )
    listed = f"python -m lstm_jax.info {workdir} lists its {len(members)} members"
    if text.lstrip("-").isdigit():
        if not 0 <= int(text) < len(members):
            raise UserError(f"member {text} is not in 0 to {len(members) - 1}; {listed}.")
        return int(text)
    wanted = {}
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise UserError(
                f"member {text!r} is not an index or NAME=VALUE settings such as "
                f"'learning_rate=0.004,seed=1'; {listed}."
            )
        wanted[name.strip().removeprefix("--")] = value.strip()

    def has(m: dict[str, Any]) -> bool:
        own = {"seed": m["seed"], **m["settings"]}
        return all(k in own and _same(own[k], v) for k, v in wanted.items())

    matching = [i for i, m in enumerate(members) if has(m)]
    if not matching:
        raise UserError(f"No member of {workdir} has {text}; {listed}.")
    return min(matching, key=lambda i: (members[i]["best_val_loss"], i))


def _same(value: Any, text: str) -> bool:
    try:
        return float(value) == float(text)
    except ValueError:
        return str(value) == text


def member_meta(meta: dict[str, Any], index: int) -> dict[str, Any]:
    """A population checkpoint's metadata as member `index`'s own run would have written it:
    its bookkeeping (best step, losses, which parameters) in place of the population's."""
    own = meta["members"][index]
    view = {k: v for k, v in meta.items() if k != "members"}
    view |= {k: v for k, v in own.items() if k not in ("settings",)}
    view["val_loss"] = own.get("val_loss", math.nan)
    view |= {
        "member": index,
        "member_settings": own["settings"],
        "population_size": len(meta["members"]),
    }
    return view
