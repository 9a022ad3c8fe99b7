"""Command-line flags, defined once, and how the commands turn them into a `Config`.

Only `lstm_jax.main` and `lstm_jax.sample` import this module. Experiments are absl flagfiles:
`python -m lstm_jax.main --flagfile=experiments/dracula_2x512.flags`.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from absl import app, flags, logging

from lstm_jax.cells import CELLS
from lstm_jax.config import DROPOUT_PLACES, DTYPES, Config
from lstm_jax.errors import UsageError, UserError

_D = Config()  # Defaults come from the dataclass, so they are written down once.

# --- Data ---
DATA_PATH = flags.DEFINE_string(
    "data_path",
    _D.data_path,
    "Local text file to train on. Empty: download Gutenberg #345 (Dracula) into --data_dir once.",
)
DATA_DIR = flags.DEFINE_string("data_dir", _D.data_dir, "Download cache folder.")
DATA_URL = flags.DEFINE_string(
    "data_url",
    _D.data_url,
    "Plain-text Project Gutenberg book to download when --data_path is empty.",
)
ENCODING = flags.DEFINE_string("encoding", _D.encoding, "Text encoding of the input file.")
LOWERCASE = flags.DEFINE_bool("lowercase", _D.lowercase, "Lower-case the text (smaller vocab).")
VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", _D.val_fraction, "Fraction of the text, at its end, held out for validation."
)
SEQ_LEN = flags.DEFINE_integer("seq_len", _D.seq_len, "Characters per training sequence (BPTT).")
GLOBAL_BATCH = flags.DEFINE_integer(
    "global_batch",
    _D.global_batch,
    "Sequences per step over all devices; must divide by the device count.",
)
CARRY_STATE = flags.DEFINE_bool(
    "carry_state",
    _D.carry_state,
    "Carry the LSTM state from one batch to the next (contiguous "
    "streams, char-rnn style). Off: independent random windows from a zero state.",
)
SEED = flags.DEFINE_integer("seed", _D.seed, "Seed for initialisation, batches and dropout.")

# --- Model ---
CELL = flags.DEFINE_string(
    "cell",
    _D.cell,
    f"Recurrent cell of every layer: one of {', '.join(CELLS)} (lstm_jax/cells/). "
    "Default lstm (nn.OptimizedLSTMCell).",
)
EMBED_DIM = flags.DEFINE_integer(
    "embed_dim", _D.embed_dim, "Character embedding size; 0: one-hot characters, no embedding."
)
HIDDEN = flags.DEFINE_integer("hidden", _D.hidden, "Units (cell width) per layer.")
NUM_LAYERS = flags.DEFINE_integer("num_layers", _D.num_layers, "Number of stacked layers.")
RESIDUAL = flags.DEFINE_bool(
    "residual",
    _D.residual,
    "Residual connections: add each layer's input to its output, from the second layer on.",
)
LAYER_NORM = flags.DEFINE_bool(
    "layer_norm", _D.layer_norm, "Layer normalisation of every layer's output (over features)."
)
TIE_EMBEDDINGS = flags.DEFINE_bool(
    "tie_embeddings",
    _D.tie_embeddings,
    "Output layer = the embedding table transposed, plus a bias; needs --embed_dim == --hidden.",
)
DROPOUT_AT = flags.DEFINE_enum(
    "dropout_at",
    _D.dropout_at,
    list(DROPOUT_PLACES),
    "Where --dropout applies. between: between stacked layers and before the output layer "
    "(default); output: before the output layer only.",
)
DTYPE = flags.DEFINE_enum(
    "dtype",
    _D.dtype,
    list(DTYPES),
    "Compute dtype of the matmuls: bfloat16 for TPUs and GPUs (lstm and gru cells). "
    "Parameters, carried state and loss stay float32, so checkpoints move between dtypes.",
)
REMAT = flags.DEFINE_bool(
    "remat",
    _D.remat,
    "Recompute each time step in the backward pass instead of storing its intermediate "
    "values: about 3x less step memory for long --seq_len, 3-12% slower on a CPU. "
    "Same results.",
)
VARIATIONAL_DROPOUT = flags.DEFINE_bool(
    "variational_dropout",
    _D.variational_dropout,
    "One dropout mask per sequence, shared by all its characters (variational or 'locked' "
    "dropout, as in AWD-LSTM), instead of a new mask for every character.",
)
DROPOUT = flags.DEFINE_float(
    "dropout", _D.dropout, "Dropout rate, [0, 1); where it applies: --dropout_at."
)

# --- Optimisation ---
OPTIMIZER = flags.DEFINE_enum("optimizer", _D.optimizer, ["adam", "adamw"], "Optimizer.")
LEARNING_RATE = flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak learning rate.")
WEIGHT_DECAY = flags.DEFINE_float(
    "weight_decay", _D.weight_decay, "Decoupled weight decay (adamw only)."
)
WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", _D.warmup_steps, "Steps of linear learning-rate warm-up from 0."
)
SCHEDULE = flags.DEFINE_string(
    "schedule",
    _D.schedule,
    "After warm-up: constant, or cosine decay to 10% of the peak at the last step.",
)
GRAD_CLIP = flags.DEFINE_float(
    "grad_clip", _D.grad_clip, "Clip gradients to this global norm; 0 turns clipping off."
)
NUM_STEPS = flags.DEFINE_integer(
    "num_steps", _D.num_steps, "Training steps; 0 means --num_epochs passes over the text."
)
NUM_EPOCHS = flags.DEFINE_float(
    "num_epochs", _D.num_epochs, "Passes over the training text, used when --num_steps=0."
)

# --- Loop and outputs ---
WORKDIR = flags.DEFINE_string(
    "workdir",
    _D.workdir,
    "Run folder: checkpoints, metrics.jsonl, flags. Running the same "
    "command again resumes from it.",
)
LOG_EVERY = flags.DEFINE_integer("log_every", _D.log_every, "Log progress every N steps.")
EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", _D.eval_every, "Evaluate on the whole validation text every N steps."
)
CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every",
    _D.checkpoint_every,
    "Save a checkpoint (with a validation run) every N steps, and always at the end.",
)
KEEP_CHECKPOINTS = flags.DEFINE_integer(
    "keep_checkpoints", _D.keep_checkpoints, "Latest checkpoints to keep, besides the best one."
)
SAMPLE_EVERY = flags.DEFINE_integer(
    "sample_every", _D.sample_every, "Print a sample every N steps; 0: only at the end."
)
RESTART = flags.DEFINE_bool(
    "restart",
    _D.restart,
    "Set aside the checkpoints in --workdir (renamed, not deleted) and start from scratch.",
)

# --- Multi-host: every host runs the same command (see lstm_jax/distributed.py) ---
DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Join a multi-process job with jax.distributed. auto: with --coordinator_address, or on a "
    "Cloud TPU VM (detected); on: always (JAX detects Cloud TPU, Slurm, Open MPI); off: never.",
)
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    "",
    "HOST:PORT of process 0, for clusters JAX does not detect (and tests). Empty: detect.",
)
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Processes in the job, with --coordinator_address. 0: detect."
)
PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "This process's index in [0, --num_processes). -1: detect."
)

# --- Sampling (main's samples, and python -m lstm_jax.sample) ---
PROMPT = flags.DEFINE_string(
    "prompt",
    "",
    "Text to start generating from. Empty: a newline (sample) or a random "
    "100-character window of the validation text (main, like the classic tutorial).",
)
LENGTH = flags.DEFINE_integer("length", _D.sample_length, "Characters to generate.")
TEMPERATURE = flags.DEFINE_float(
    "temperature", _D.sample_temperature, "Sampling temperature; 0 is greedy argmax."
)
TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely characters; 0: all.")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to generate at once.")
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "best", "Checkpoint to sample from: latest, best or a step number."
)
UNKNOWN = flags.DEFINE_enum(
    "unknown",
    "error",
    ["error", "skip"],
    "Prompt characters outside the vocabulary: stop with an error, or drop them.",
)


def config_from_flags() -> Config:
    """The run's `Config`, built from the parsed flags."""
    return Config(
        data_path=DATA_PATH.value,
        data_dir=DATA_DIR.value,
        data_url=DATA_URL.value,
        encoding=ENCODING.value,
        lowercase=LOWERCASE.value,
        val_fraction=VAL_FRACTION.value,
        seq_len=SEQ_LEN.value,
        global_batch=GLOBAL_BATCH.value,
        carry_state=CARRY_STATE.value,
        seed=SEED.value,
        cell=CELL.value,
        embed_dim=EMBED_DIM.value,
        hidden=HIDDEN.value,
        num_layers=NUM_LAYERS.value,
        dropout=DROPOUT.value,
        dropout_at=DROPOUT_AT.value,
        variational_dropout=VARIATIONAL_DROPOUT.value,
        remat=REMAT.value,
        residual=RESIDUAL.value,
        layer_norm=LAYER_NORM.value,
        tie_embeddings=TIE_EMBEDDINGS.value,
        dtype=DTYPE.value,
        optimizer=OPTIMIZER.value,
        learning_rate=LEARNING_RATE.value,
        weight_decay=WEIGHT_DECAY.value,
        warmup_steps=WARMUP_STEPS.value,
        schedule=SCHEDULE.value,
        grad_clip=GRAD_CLIP.value,
        num_steps=NUM_STEPS.value,
        num_epochs=NUM_EPOCHS.value,
        workdir=WORKDIR.value,
        log_every=LOG_EVERY.value,
        eval_every=EVAL_EVERY.value,
        checkpoint_every=CHECKPOINT_EVERY.value,
        keep_checkpoints=KEEP_CHECKPOINTS.value,
        sample_every=SAMPLE_EVERY.value,
        sample_length=LENGTH.value,
        sample_temperature=TEMPERATURE.value,
        sample_prompt=PROMPT.value,
        restart=RESTART.value,
    )


def sample_options() -> dict[str, Any]:
    """What `python -m lstm_jax.sample` reads; the model itself comes from the checkpoint."""
    return {
        "workdir": WORKDIR.value,
        "checkpoint": CHECKPOINT.value,
        "prompt": PROMPT.value,
        "length": LENGTH.value,
        "temperature": TEMPERATURE.value,
        "top_k": TOP_K.value,
        "num_samples": NUM_SAMPLES.value,
        "seed": SEED.value,
        "unknown": UNKNOWN.value,
    }


def distributed_options() -> dict[str, Any]:
    """What `lstm_jax.distributed.initialize` takes: where this process is, not what it trains."""
    return {
        "mode": DISTRIBUTED.value,
        "coordinator_address": COORDINATOR_ADDRESS.value,
        "num_processes": NUM_PROCESSES.value,
        "process_id": PROCESS_ID.value,
    }


def flagfile_text() -> str:
    """Every flag's value, as a flagfile that reproduces the run even if a default changes.

    Left out: the multi-host flags, which differ per process and per cluster, not per run, and
    the flags only `python -m lstm_jax.sample` reads.
    """
    lines = []
    for holder in _ALL_FLAGS:
        if holder.name in _LAUNCH_FLAG_NAMES or holder.name in _SAMPLE_ONLY_FLAG_NAMES:
            continue
        lines.append(flags.FLAGS[holder.name].serialize())
    return "\n".join(lines) + "\n"


_ALL_FLAGS = [value for value in list(globals().values()) if isinstance(value, flags.FlagHolder)]
_LAUNCH_FLAG_NAMES = {f.name for f in (DISTRIBUTED, COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID)}
# Read by `python -m lstm_jax.sample` only; training would silently ignore them.
_SAMPLE_ONLY_FLAG_NAMES = {f.name for f in (TOP_K, NUM_SAMPLES, CHECKPOINT, UNKNOWN)}


def refuse_sampling_only_flags() -> None:
    """`main` samples with --prompt, --length and --temperature; the rest belong to `sample`."""
    given = sorted(name for name in _SAMPLE_ONLY_FLAG_NAMES if flags.FLAGS[name].present)
    if given:
        raise UsageError(
            f"--{', --'.join(given)} only apply to python -m lstm_jax.sample; drop them here, "
            "or sample from the workdir after training."
        )


def refuse_model_flags_unlike(saved_settings: dict[str, Any]) -> None:
    """`sample` builds the model from the checkpoint: a model flag given with another value, or a
    compute dtype other than float32, would be silently ignored, so it is refused instead.

    Flags equal to the checkpoint's settings pass, so a run's own flagfile can be reused.
    """
    differing = [
        f"--{name}={flags.FLAGS[name].value} (the checkpoint has {saved_settings[name]!r})"
        for name in Config().model_settings()
        if flags.FLAGS[name].present and flags.FLAGS[name].value != saved_settings.get(name)
    ]
    if DTYPE.present and DTYPE.value != "float32":
        differing.append(f"--dtype={DTYPE.value} (sampling computes in float32)")
    if differing:
        raise UsageError(
            "python -m lstm_jax.sample takes the model from the checkpoint; drop "
            f"{', '.join(differing)}, or point --workdir at a run trained that way."
        )


def refuse_positional_arguments(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(
            f"Unexpected arguments: {' '.join(argv[1:])}; flags look like --name=value."
        )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` into one line on stderr and its exit code, with no traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def run(main: Callable[[list[str]], None]) -> None:
    """Parse flags (absl, plus --jax_* flags) and run `main`."""
    import jax

    jax.config.config_with_absl()
    logging.get_absl_logger().addFilter(_quiet_libraries)
    # "Unable to initialize backend 'tpu'" on every CPU or GPU machine is noise, not news.
    pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.WARNING)
    app.run(main)


def _quiet_libraries(record) -> bool:
    """Orbax logs every file it writes at INFO; keep only its warnings and errors."""
    return record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname
