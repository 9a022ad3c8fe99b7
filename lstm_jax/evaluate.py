"""Scoring a text with a model, and the command that scores a checkpoint:

    python -m lstm_jax.evaluate --workdir=runs/dracula_2x512_best              # its test part
    python -m lstm_jax.evaluate --workdir=W --split=val --dynamic --dynamic_lr=3e-5
    python -m lstm_jax.evaluate --workdir=W --checkpoint=2400 --text=notes.txt --unknown=skip

The command reads the whole text as `--streams` contiguous streams (default one: the text read
once, left to right, the state carried through it) and ends with one line,
`NAME: X.XXXX bpc (Y.YYYY nats/char, N characters)`. The run's own text (--split) is cut as
training cut it, from the settings saved with the checkpoint; `--dynamic` adapts the weights
as they read (`lstm_jax.dynamic`); `--cache` mixes each prediction with the continuous cache
(`lstm_jax.cache`); `--ensemble=W1,W2` scores several runs' models as one, the mean of their
probabilities (`lstm_jax.ensemble`; a population's folder gives every member). The cache and
the ensemble go through `lstm_jax.scoring`, one jitted pass that combines them with `--dynamic`:

    python -m lstm_jax.evaluate --ensemble=runs/dracula_20min_seeds3 --cache --dynamic

`evaluate` takes the (mapped) evaluation step as an argument: the training loop passes its
pmapped step, `score_ids` a jitted one on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import cli, scoring, steps
from lstm_jax.cache import CacheConfig
from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.config import DataConfig, from_dict, section, setting
from lstm_jax.data import Batcher, Split, Vocab, eval_streams, load_split
from lstm_jax.dynamic import DynamicConfig
from lstm_jax.errors import UsageError, UserError
from lstm_jax.models import Carry, CharLSTM
from lstm_jax.reader import MEMBER_HELP, member_note, population_size, restore_model
from lstm_jax.settings import POSITIVE

Streams = tuple[np.ndarray, np.ndarray, np.ndarray]  # inputs, targets, weights: [chunks, rows, T]


def evaluate(
    eval_step: Callable,
    params: Any,
    streams: Streams,
    zero_carry: Carry,
    shard: Callable[[np.ndarray], Any] = lambda x: x,
) -> float:
    """Mean loss (nats per character) over `streams`, carrying the state from chunk to chunk.

    eval_step: (params, carry, inputs, targets, weights) -> (carry, {"loss_sum", "count"}).
    zero_carry: the state each stream starts from, laid out as `eval_step` takes it.
    shard: lays a [rows, T] chunk out for `eval_step` (devices first, for a pmapped step).
    Padding has weight 0, so it counts neither in the loss nor in the count.
    """
    sums = _chunk_sums(eval_step, params, streams, zero_carry, shard)
    return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)


def _chunk_sums(eval_step, params, streams: Streams, zero_carry: Carry, shard) -> list[Any]:
    """The metric sums of every chunk, on the host; the state carried from chunk to chunk."""
    inputs, targets, weights = streams
    carry, sums = zero_carry, []
    for chunk in range(inputs.shape[0]):
        carry, chunk_sums = eval_step(
            params, carry, shard(inputs[chunk]), shard(targets[chunk]), shard(weights[chunk])
        )
        sums.append(chunk_sums)
    return jax.device_get(sums)


def evaluate_members(
    eval_step: Callable,
    params: Any,
    streams: Streams,
    zero_carry: Carry,
    shard: Callable[[np.ndarray], Any],
    num_members: int,
) -> np.ndarray:
    """`evaluate` for a population: every member's mean loss, [members], from a step whose
    metric sums are per member."""
    sums = _chunk_sums(eval_step, params, streams, zero_carry, shard)

    def total(name: str) -> np.ndarray:  # Summed in float64, chunk by chunk, as `evaluate` does.
        parts = [np.asarray(s[name], np.float64).reshape(num_members) for s in sums]
        return functools.reduce(np.add, parts)

    return total("loss_sum") / total("count")


SCORE_CHUNK = 256  # Characters per evaluation step of one stream (one compile for any length).


@functools.cache
def _jitted_eval_step(apply_fn: Callable) -> Callable:
    return jax.jit(functools.partial(steps.eval_step, apply_fn=apply_fn))


def score_ids(
    model: CharLSTM, params: Any, ids: np.ndarray, num_streams: int = 1, chunk: int = SCORE_CHUNK
) -> float:
    """Mean loss (nats per character) of every character of `ids` after the first, read as
    `num_streams` contiguous streams from a zero state with the state carried through each:
    one stream is the whole text read once, left to right. On one device."""
    streams = eval_streams(ids, num_streams, chunk)
    zero = jax.tree.map(jnp.asarray, model.initialize_carry(num_streams))
    return evaluate(_jitted_eval_step(model.apply), params, streams, zero)


def test_best_checkpoint(
    checkpoints: Checkpoints,
    model: CharLSTM,
    params_like: Any,
    test_ids: np.ndarray,
    member: int | None = None,
) -> tuple[int, str, float] | None:
    """(step, which parameters, test loss) of the best checkpoint's model over `test_ids`, read as
    one stream; None without a checkpoint or a test text. `params_like`: any tree shaped like
    the parameters (for a population, stacked: then `member` picks whose best is scored)."""
    step = checkpoints.best_step(member)
    if step is None or len(test_ids) < 2:
        return None
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params, which = checkpoints.restore_model_params(
        step, abstract_like(params_like, local), member
    )
    return step, which, score_ids(model, params, test_ids)


# --- The command -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """evaluation: which checkpoint, on which text, read how"""

    workdir: str = setting("runs/default", "Run folder of the model to score.")
    checkpoint: str = setting("best", "Checkpoint: latest, best or a step number.")
    member: str = setting("", MEMBER_HELP)
    split: str = setting(
        "test", "Part of the run's own text to score, cut as training cut it.",
        choices=Split.NAMES,
    )  # fmt: skip
    text: str = setting("", "A UTF-8 text file to score instead of --split.")
    unknown: str = setting(
        "error", "Characters of --text outside the model's vocabulary: stop with an error "
        "naming them, or skip them (scoring the rest).", choices=("error", "skip"),
    )  # fmt: skip
    streams: int = setting(
        1, "Read the text as this many contiguous streams, each from a zero state (faster on "
        "an accelerator; each stream start costs a little).", within=POSITIVE,
    )  # fmt: skip
    dynamic: bool = setting(False, "Dynamic evaluation: adapt the weights as the text is read.")
    dynamic_options: DynamicConfig = section(DynamicConfig)
    cache_options: CacheConfig = section(CacheConfig)
    ensemble: str = setting(
        "", "Comma-separated run folders whose models are scored as one, the mean of their "
        "probabilities, each at its best checkpoint; a population's folder gives every member. "
        "In place of --workdir, --checkpoint and --member.",
    )  # fmt: skip


def main(argv: list[str]) -> None:
    with cli.user_errors():
        cli.refuse_positional_arguments(argv)
        options = cli.read_flags(EvaluateOptions)
        _refuse_contradictions(options)
        started = time.perf_counter()
        if options.ensemble or options.cache_options.cache:
            name, ids, loss, note = _score_combined(options)
        else:
            name, ids, loss, note = _score_one(options)
        print(f"{note}; {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print(
            f"{name}: {steps.bits_per_char(loss):.4f} bpc ({loss:.4f} nats/char, "
            f"{len(ids) - 1:,} predicted characters: all but the first)"
        )


def _refuse_contradictions(options: EvaluateOptions) -> None:
    """One line for flags that contradict each other or do nothing without their switch."""
    given = cli.given_settings(EvaluateOptions)
    if options.text and "split" in given:
        raise UsageError("--text and --split both choose the text; pass only one.")
    switches = (
        ("dynamic", options.dynamic, DynamicConfig),
        ("cache", options.cache_options.cache, CacheConfig),
    )
    for switch, on, spec in switches:
        orphans = sorted(cli.given_settings(spec) - {switch})
        if orphans and not on:
            raise UsageError(
                f"--{orphans[0]} is a setting of --{switch}; pass --{switch} too, or drop it."
            )
    if options.ensemble:
        named = sorted(given & {"workdir", "checkpoint", "member"})
        if named:
            raise UsageError(
                f"--ensemble names the models (each at its best checkpoint); drop --{named[0]}."
            )


def _score_one(options: EvaluateOptions) -> tuple[str, np.ndarray, float, str]:
    """(text's name, its ids, mean loss, note) of --workdir's model, plain or dynamic."""
    model, params, vocab, step, meta = restore_model(
        options.workdir, options.checkpoint, options.member
    )
    name, ids = _text_to_score(options, meta, vocab)
    note = f"# checkpoint step {_which_parameters(step, meta)}; {options.streams} stream(s)"
    if not options.dynamic:
        return name, ids, score_ids(model, params, ids, options.streams), note
    loss = _dynamic_loss(options, meta, vocab, model, params, ids)
    return name + " (dynamic evaluation)", ids, loss, note + _dynamic_note(options)


def _which_parameters(step: int, meta: dict[str, Any]) -> str:
    """'STEP (EMA parameters, member K ...)': the step, which of its parameter sets was read
    (the EMA where the run kept one and it scored better on validation), and the member."""
    which = "EMA parameters" if meta.get("selected") == "ema_params" else "parameters"
    return f"{step} ({which}{member_note(meta)})"


def _dynamic_note(options: EvaluateOptions) -> str:
    dyn = options.dynamic_options
    return (
        f"; dynamic evaluation: lr {dyn.dynamic_lr:g}, decay {dyn.dynamic_decay:g}, "
        f"segments of {dyn.dynamic_segment}, gradient RMS over "
        f"{dyn.dynamic_stat_batches} training batches"
    )


def _score_combined(options: EvaluateOptions) -> tuple[str, np.ndarray, float, str]:
    """(text's name, its ids, mean loss, note) of the ensemble or --workdir's model, with the
    cache and dynamic evaluation as asked, in one `lstm_jax.scoring` pass."""
    folders, restored = _models_to_score(options)
    _, _, vocab, _, meta = restored[0]
    name, ids = _text_to_score(options, meta, vocab)
    _refuse_other_texts(options, folders, restored, ids)
    dyn = options.dynamic_options
    members = []
    for model, params, _, _, member_meta in restored:
        rms = _gradient_rms(options, member_meta, vocab, model, params) if options.dynamic else None
        members.append(scoring.Member(model, params, rms))
    adapt = (
        scoring.Adapt(dyn.dynamic_lr, dyn.dynamic_decay, dyn.dynamic_segment, dyn.dynamic_epsilon)
        if options.dynamic
        else None
    )
    cache = options.cache_options if options.cache_options.cache else None
    loss, _ = scoring.score(members, ids, num_streams=options.streams, cache=cache, adapt=adapt)
    steps_read = ", ".join(_which_parameters(step, m) for _, _, _, step, m in restored)
    note = f"# checkpoint step(s) {steps_read}; {options.streams} stream(s)"
    if len(restored) > 1:
        name += f" (ensemble of {len(restored)})"
    if cache is not None:
        name += " (cache)"
        note += (
            f"; cache: window {cache.cache_window}, theta {cache.cache_theta:g}, "
            f"lambda {cache.cache_lambda:g}, on the first model's hidden states"
        )
    if options.dynamic:
        name += " (dynamic evaluation)"
        note += _dynamic_note(options)
    return name, ids, loss, note


def _models_to_score(options: EvaluateOptions) -> tuple[list[str], list[tuple]]:
    """(the run folder of each model, `restore_model`'s answer for each): --workdir's model, or
    every --ensemble folder's (each member of a population's), each at its best checkpoint.
    A `UserError` where two read other vocabularies."""
    if not options.ensemble:
        return [options.workdir], [
            restore_model(options.workdir, options.checkpoint, options.member)
        ]
    named = [f.strip() for f in options.ensemble.split(",") if f.strip()]
    if not named:
        raise UsageError("--ensemble names no run folder; pass W1,W2,...")
    folders, restored = [], []
    for folder in named:
        size = population_size(folder)
        for member in range(size) if size else [""]:
            restored.append(restore_model(folder, "best", member))
            folders.append(folder)
    for folder, (_, _, vocab, _, _) in zip(folders, restored, strict=True):
        if vocab != restored[0][2]:
            raise UserError(
                f"{folder}'s model reads another vocabulary than {folders[0]}'s; an ensemble "
                "needs the same characters."
            )
    return folders, restored


def _refuse_other_texts(options, folders: list[str], restored: list[tuple], ids) -> None:
    """A `UserError` where a model's run cut another --split text than the first's (a --text
    is the same for all)."""
    if options.text:
        return
    seen = {json.dumps(restored[0][4].get("config", {}).get("data"), sort_keys=True)}
    for folder, (_, _, vocab, _, meta) in zip(folders, restored, strict=True):
        key = json.dumps(meta.get("config", {}).get("data"), sort_keys=True)
        if key in seen:  # Cut by the same settings: the same text, not loaded again.
            continue
        if not np.array_equal(_text_to_score(options, meta, vocab)[1], ids):
            raise UserError(
                f"{folder}'s run cut another {options.split} text than {folders[0]}'s; score "
                "a file with --text=FILE."
            )
        seen.add(key)


def run_data_config(meta: dict[str, Any]) -> DataConfig:
    """The data settings a checkpoint's run trained with (those before --test_fraction had no
    test part)."""
    saved = meta.get("config", {}).get("data")
    if saved is None:
        raise UserError(
            "This checkpoint does not record its run's text (it predates the saved config); "
            "score a file with --text=FILE."
        )
    return from_dict(DataConfig, {"test_fraction": 0.0, **saved})


def _text_to_score(options: EvaluateOptions, meta: dict, vocab: Vocab) -> tuple[str, np.ndarray]:
    if not options.text:
        _, split, _ = load_split(run_data_config(meta), lambda _: vocab)
        ids = getattr(split, options.split)
        if len(ids) < 2:
            raise UserError(
                f"The run has no {options.split} text (trained with --test_fraction=0, or "
                "before it existed); choose another --split or score a file with --text."
            )
        return options.split, ids
    text = cli.read_utf8_flag("text", options.text)
    missing = vocab.unknown(text)
    if missing:
        count = sum(text.count(c) for c in missing)
        shown = " ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
        if options.unknown != "skip":
            raise UserError(
                f"{options.text} has {count:,} character(s) outside the model's vocabulary "
                f"({len(missing)} distinct: {shown}); pass --unknown=skip to score the rest."
            )
        print(f"# skipped {count:,} character(s) outside the vocabulary: {shown}", file=sys.stderr)
        text = "".join(c for c in text if c not in set(missing))
    if len(text) < 2:
        raise UserError(f"{options.text} has fewer than 2 characters to score.")
    return options.text, vocab.encode(text)


def _gradient_rms(options, meta, vocab, model, params) -> Any:
    """Dynamic evaluation's gradient RMS, over the run's own training text."""
    from lstm_jax.dynamic import gradient_rms

    data = run_data_config(meta)
    _, split, _ = load_split(data, lambda _: vocab)
    batcher = Batcher(split.train, data.seq_len, data.global_batch, data.seed, data.carry_state)
    return gradient_rms(model, params, batcher, options.dynamic_options.dynamic_stat_batches)


def _dynamic_loss(options, meta, vocab, model, params, ids) -> float:
    from lstm_jax.dynamic import DynamicEvaluator

    dyn = options.dynamic_options
    rms = _gradient_rms(options, meta, vocab, model, params)
    evaluator = DynamicEvaluator(model, params, rms, dyn.dynamic_epsilon)
    loss, _ = evaluator.score(
        ids,
        lr=dyn.dynamic_lr,
        decay=dyn.dynamic_decay,
        segment=dyn.dynamic_segment,
        num_streams=options.streams,
    )
    return loss


if __name__ == "__main__":
    cli.run(main, [EvaluateOptions])
