"""Fine-tuning: a new run that starts from another run's parameters (`--init_from`).

`--init_from=WORKDIR[:best|latest|STEP]` gives a fresh start (step 0, a fresh optimizer and
learning-rate schedule) the parameters of that checkpoint, and the model settings are the
checkpoint's. A workdir that already holds checkpoints of its own resumes them as usual, so the
same command run again continues the fine-tuning run; its model settings and vocabulary then
come from its own newest checkpoint, and the run it started from may be gone.

The vocabulary is the checkpoint's, so every character keeps its id. Characters of the new text
that it lacks are an error, or with `--extend_vocab` are appended to it (sorted): their
embedding rows and output-layer columns are new parameters, taken from a fresh initialisation
of the bigger model, and every learnt parameter is kept bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import steps
from lstm_jax.checkpoint import Checkpoints, abstract_like, checkpoint_dir, workdir_path
from lstm_jax.config import Config, ModelConfig, model_config_from_settings
from lstm_jax.data import Vocab, load_split
from lstm_jax.errors import NoCheckpoint, UsageError, UserError
from lstm_jax.models import CharLSTM, init_params
from lstm_jax.reader import beside_trainer
from lstm_jax.steps import TrainState, bits_per_char

SELECTORS = ("best", "latest")
_SHOWN_CHARS = 20  # New characters named in the error, at most.


@dataclasses.dataclass(frozen=True)
class Start:
    """The checkpoint a fine-tuning run starts from, or its own newest one when it resumes."""

    workdir: str
    step: int
    meta: dict[str, Any]
    own: bool  # The run's own checkpoint (it resumes), not --init_from's.

    @property
    def model(self) -> ModelConfig:
        return model_config_from_settings(self.meta["settings"])

    @property
    def vocab(self) -> str:
        return self.meta["vocab"]

    def where(self) -> str:
        return f"{checkpoint_dir(self.workdir)}/{self.step}"


def parse_init_from(spec: str) -> tuple[str, str]:
    """'WORKDIR[:best|latest|STEP]' -> (workdir, which checkpoint); a bare WORKDIR means best.

    Only a last ':' with no '/' after it starts a selector, so 'gs://bucket/run' is a workdir.
    """
    workdir, colon, which = spec.rpartition(":")
    if not colon or "/" in which:
        return spec, "best"
    if which in SELECTORS or which.isdigit():
        return workdir, which
    raise UsageError(
        f"--init_from={spec}: {which!r} is not best, latest or a step number; give WORKDIR, "
        "WORKDIR:best, WORKDIR:latest or WORKDIR:STEP."
    )


def open_start(config: Config) -> Start | None:
    """What the run's parameters come from: None without --init_from; the run's own newest
    readable checkpoint when its workdir has one (and no --restart); else --init_from's."""
    if not config.init.init_from:
        return None
    if not config.loop.restart:
        own = Checkpoints(config.loop.workdir, read_only=True)
        try:
            for step in sorted(own.steps(), reverse=True):
                try:
                    return Start(config.loop.workdir, step, own.read_meta(step), own=True)
                except Exception:  # noqa: BLE001, S112 - resuming sets damaged ones aside.
                    continue
        finally:
            own.close()
    return _init_source(config.init.init_from)[0]


def _init_source(spec: str, with_params: bool = False) -> tuple[Start, Any]:
    """--init_from's checkpoint (and its parameters, `with_params`), read `beside_trainer`."""
    workdir, which = parse_init_from(spec)
    if not workdir_path(workdir).is_dir():
        raise UserError(
            f"--init_from={spec}: {workdir} does not exist; give the --workdir of a trained "
            "run, as WORKDIR[:best|latest|STEP]."
        )
    return beside_trainer(
        workdir,
        which,
        lambda reading: _read_source(spec, workdir, which, reading, with_params),
        pick=f"--init_from={workdir}:STEP",
    )


def _read_source(
    spec: str, workdir: str, which: str, reading: list[int], with_params: bool
) -> tuple[Start, Any]:
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        saved = checkpoints.steps()
        if not saved:
            raise NoCheckpoint(
                f"--init_from={spec}: no checkpoint in {checkpoints.directory}; give a run "
                "that has saved one (python -m lstm_jax.info WORKDIR lists them)."
            )
        if which.isdigit() and int(which) not in saved:
            raise UserError(
                f"--init_from={spec}: there is no step {int(which)}; use best, latest or one "
                f"of the saved steps {sorted(saved)}."
            )
        step = checkpoints.best_step() if which == "best" else checkpoints.resolve(which)
        if step is None:  # No validation loss recorded: the newest stands in for the best.
            step = checkpoints.latest_step()
        reading.append(step)
        try:
            start = Start(workdir, step, checkpoints.read_meta(step), own=False)
            params = _restore_params(checkpoints, start) if with_params else None
        except Exception as e:  # noqa: BLE001 - any failure to read: pick another.
            raise UserError(
                f"--init_from={spec}: checkpoint {checkpoints.directory}/{step} cannot be read "
                f"({type(e).__name__}); give another step (WORKDIR:STEP)."
            ) from None
    finally:
        checkpoints.close()
    return start, params


def check_model(config: Config, start: Start, given: set[str] | None = None) -> Config:
    """`config` with the checkpoint's model settings; a `UsageError` lists those of `given`
    (flags set on the command line; None: every model setting) that differ from them."""
    saved = start.model
    names = given if given is not None else {f.name for f in dataclasses.fields(ModelConfig)}
    differences = [
        f"--{f.name}={getattr(config.model, f.name)!r} (the checkpoint has "
        f"{getattr(saved, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name in names and getattr(config.model, f.name) != getattr(saved, f.name)
    ]
    if differences:
        raise UsageError(
            f"The model settings come from the checkpoint {start.where()}, but "
            f"{'; '.join(differences)}: drop those flags, or give the checkpoint's values."
        )
    return config.replace(model=saved)


def extended_vocab(saved_chars: str, text: str, extend: bool) -> Vocab:
    """The checkpoint's vocabulary, with the text's new characters appended (sorted) if
    `extend`; without it, new characters are a `UserError` naming them."""
    new = sorted(Vocab(saved_chars).unknown(text))
    if new and not extend:
        shown = " ".join(repr(c) for c in new[:_SHOWN_CHARS])
        more = f" and {len(new) - _SHOWN_CHARS} more" if len(new) > _SHOWN_CHARS else ""
        raise UserError(
            f"The text has {len(new)} character(s) that the checkpoint's vocabulary of "
            f"{len(saved_chars)} lacks: {shown}{more}; pass --extend_vocab to add them to the "
            "model, or remove them from the text."
        )
    return Vocab(saved_chars + "".join(new))


def vocab_builder(config: Config) -> Callable[[str], Vocab] | None:
    """How the run's vocabulary is made from its text: None (the text's sorted characters)
    without --init_from; else the checkpoint's characters, plus the text's new ones with
    --extend_vocab."""
    start = open_start(config)
    if start is None:
        return None
    return functools.partial(extended_vocab, start.vocab, extend=config.init.extend_vocab)


def prepare(config: Config, given: set[str]) -> Config:
    """For the command line, before it writes anything: `config` with the checkpoint's model
    settings, after refusing model flags that differ, and the text checked against its
    vocabulary. Every refusal is a `UserError`."""
    start = open_start(config)
    config = check_model(config, start, given)
    config.validate()
    load_split(config.data, vocab_builder(config))  # As the run will: new characters refused.
    return config


def init_state(
    config: Config, vocab: Vocab, total_steps: int, log: Callable[[str], None] = print
) -> tuple[CharLSTM, TrainState]:
    """`steps.init_state`, and with --init_from on a fresh start, the checkpoint's parameters
    (grown to `vocab`) with a fresh optimizer state for them."""
    start = open_start(config)
    if start is not None and not start.own:
        check_model(config, start)  # The library takes no defaults from it: all must match.
        if not vocab.chars.startswith(start.vocab):
            raise ValueError("The run's vocabulary must begin with the checkpoint's.")
    model, state = steps.init_state(config, vocab.size, total_steps)
    if start is None or start.own:
        return model, state
    # Read again with the parameters: beside a running trainer, its step may have changed.
    start, learnt = _init_source(config.init.init_from, with_params=True)
    params = jax.tree.map(jnp.asarray, grow(learnt, jax.device_get(state.params)))
    added = vocab.size - len(start.vocab)
    val_bpc = bits_per_char(start.meta.get("val_loss", float("nan")))
    log(
        f"Fine-tuning from {start.where()} (validation {val_bpc:.4f} bpc): its parameters, a "
        "fresh optimizer and schedule"
        + (f"; {added} new character(s) added to its vocabulary." if added else ".")
    )
    ema_params = None if state.ema_params is None else params  # The average starts there too.
    return model, state.replace(
        params=params, opt_state=state.tx.init(params), ema_params=ema_params
    )


def _restore_params(checkpoints: Checkpoints, start: Start) -> Any:
    """The checkpoint's model parameters (their average, if that was its model), on the host
    as numpy arrays."""
    model = CharLSTM(start.model, len(start.vocab))
    abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params, _ = checkpoints.restore_model_params(start.step, abstract_like(abstract, sharding))
    return jax.device_get(params)


def grow(learnt: Any, fresh: Any) -> Any:
    """`learnt` parameters in the shapes of `fresh` (a bigger vocabulary): each array is copied
    into the leading corner of the fresh one, whose other rows/columns stay as initialised."""

    def one(old: np.ndarray, new: np.ndarray) -> np.ndarray:
        old = np.asarray(old)
        if old.shape == new.shape:
            return old
        out = np.array(new, copy=True)
        out[tuple(slice(0, n) for n in old.shape)] = old
        return out

    return jax.tree.map(one, learnt, fresh)
