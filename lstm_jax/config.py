"""The run configuration: frozen dataclasses that every library function takes.

Each setting is declared once, as a field with `setting(default, help, ...)`: the command-line
flags are generated from these fields (`lstm_jax.cli`), and a `Config` is built back from the
parsed flags generically. A `Config` is made of sections, one per concern, and each section is
a group in `--help`. `ModelConfig` holds the settings that fix the parameters' shapes and
meaning; a checkpoint saves it as a dict, and the model takes it whole.

Only the command-line modules read absl flags; tests and notebooks build a `Config` directly
(`Config.create(hidden=128, ...)` takes the flat setting names) and never touch flags.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from lstm_jax.errors import UsageError

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw")
DROPOUT_PLACES = ("between", "output")
DTYPES = ("float32", "bfloat16")

# Model settings added after the first checkpoints were written, with the value those runs had.
_ADDED_MODEL_SETTINGS = {
    "cell": "lstm",
    "residual": False,
    "layer_norm": False,
    "tie_embeddings": False,
}


def setting(
    default: Any,
    help: str,  # noqa: A002 - the word absl uses.
    *,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    must_match: bool = False,
) -> Any:
    """A dataclass field that is also a command-line flag.

    help: one line for `--help`, with the unit where there is one (the default is added).
    choices: the allowed strings, for an enum flag.
    flag: the flag's name where it differs from the field's.
    must_match: a resumed run must have the same value as the run it continues.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "must_match": must_match}
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    """A nested section of settings, with its defaults."""
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What text the model reads, and how it is cut into batches."""

    data_path: str = setting(
        "", "Local text file to train on. Empty: download Gutenberg #345 (Dracula) once."
    )
    data_dir: str = setting("~/.cache/lstm_jax", "Download cache folder.")
    data_url: str = setting(
        "https://www.gutenberg.org/cache/epub/345/pg345.txt",
        "Plain-text Project Gutenberg book to download when --data_path is empty.",
    )
    encoding: str = setting("utf-8", "Text encoding of the input file.")
    lowercase: bool = setting(False, "Lower-case the text (smaller vocabulary).", must_match=True)
    val_fraction: float = setting(
        0.1, "Fraction of the text, at its end, held out for validation.", must_match=True
    )
    seq_len: int = setting(100, "Characters per training sequence (BPTT length).", must_match=True)
    global_batch: int = setting(
        64,
        "Sequences per step over all devices; must divide by the device count.",
        must_match=True,
    )
    carry_state: bool = setting(
        True,
        "Carry the recurrent state from one batch to the next (contiguous streams, char-rnn "
        "style). Off: independent random windows from a zero state.",
        must_match=True,
    )
    seed: int = setting(
        0, "Seed for initialisation, batches, dropout and samples.", must_match=True
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Settings that fix the parameters' shapes and meaning: a checkpoint fits only these.

    Saved with every checkpoint (as a dict); the model takes this dataclass whole.
    """

    cell: str = setting(
        "lstm",
        "Recurrent cell of every layer, a key of lstm_jax.cells.CELLS (lstm is "
        "nn.OptimizedLSTMCell).",
    )
    embed_dim: int = setting(64, "Character embedding size; 0: one-hot characters, no table.")
    hidden: int = setting(512, "Units (cell width) per layer.")
    num_layers: int = setting(2, "Number of stacked layers.")
    residual: bool = setting(
        False, "Residual connections: add each layer's input to its output, from layer 2 on."
    )
    layer_norm: bool = setting(False, "LayerNorm on every layer's output (over features).")
    tie_embeddings: bool = setting(
        False,
        "Output layer = the embedding table transposed, plus a bias; needs embed_dim == hidden.",
    )


@dataclasses.dataclass(frozen=True)
class RegularizationConfig:
    """Regularisers active in training only; evaluation and sampling run without them."""

    dropout: float = setting(0.2, "Dropout rate in [0, 1); where it applies: --dropout_at.")
    dropout_at: str = setting(
        "between",
        "Where --dropout applies. between: between stacked layers and before the output "
        "layer; output: before the output layer only.",
        choices=DROPOUT_PLACES,
    )
    variational_dropout: bool = setting(
        False,
        "One dropout mask per sequence, shared by all its characters (variational or "
        "'locked' dropout, as in AWD-LSTM), instead of a new mask for every character.",
    )


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How the model computes: the same results up to rounding, so checkpoints move freely."""

    dtype: str = setting(
        "float32",
        "Compute dtype of the matmuls: bfloat16 for TPUs and GPUs (lstm and gru cells). "
        "Parameters, carried state and loss stay float32.",
        choices=DTYPES,
    )
    remat: bool = setting(
        False,
        "Recompute each time step in the backward pass instead of storing it: about 3x less "
        "step memory for long --seq_len, 3-12% slower on a CPU. Same results.",
    )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    optimizer: str = setting("adamw", "Optimizer.", choices=OPTIMIZERS)
    learning_rate: float = setting(2e-3, "Peak learning rate.")
    weight_decay: float = setting(0.01, "Decoupled weight decay (adamw only).")
    warmup_steps: int = setting(100, "Steps of linear learning-rate warm-up from 0.")
    schedule: str = setting(
        "cosine",
        "After warm-up: constant, or cosine decay to 10% of the peak at the last step.",
        choices=SCHEDULES,
    )
    grad_clip: float = setting(5.0, "Clip gradients to this global norm; 0 turns clipping off.")
    num_steps: int = setting(0, "Training steps; 0: --num_epochs passes over the text.")
    num_epochs: float = setting(12.0, "Passes over the training text, used when --num_steps=0.")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Where the run lives and what it does besides training steps."""

    workdir: str = setting(
        "runs/default",
        "Run folder: checkpoints, metrics.jsonl, flags.txt. Running the same command again "
        "resumes from it.",
    )
    log_every: int = setting(50, "Log progress every N steps.")
    eval_every: int = setting(200, "Evaluate on the whole validation text every N steps.")
    checkpoint_every: int = setting(
        200, "Save a checkpoint (after a validation run) every N steps, and always at the end."
    )
    keep_checkpoints: int = setting(2, "Latest checkpoints to keep, besides the best one.")
    sample_every: int = setting(0, "Print a sample every N steps; 0: only at the end.")
    restart: bool = setting(
        False, "Set aside the checkpoints in --workdir (renamed, not deleted); start afresh."
    )


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The text generated from a model: by `main` for its log, and by `sample`."""

    prompt: str = setting(
        "",
        "Text to start generating from. Empty: a newline (sample) or a random 100-character "
        "window of the validation text (main).",
    )
    length: int = setting(300, "Characters to generate.")
    temperature: float = setting(0.8, "Sampling temperature; 0 is greedy argmax.")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Defaults are the headline model."""

    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    regularization: RegularizationConfig = section(RegularizationConfig)
    compute: ComputeConfig = section(ComputeConfig)
    optim: OptimConfig = section(OptimConfig)
    loop: LoopConfig = section(LoopConfig)
    sample: SampleConfig = section(SampleConfig)

    @classmethod
    def create(cls, **settings: Any) -> Config:
        """A `Config` from flat setting names: `Config.create(hidden=128, seq_len=64)`."""
        return cls().replace(**settings)

    def replace(self, **changes: Any) -> Config:
        """A copy with settings changed, by flat name (`hidden=128`) or by section."""
        return replace_settings(self, changes)

    def run_settings(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run it continues (besides the vocabulary):
        the model's, those marked `must_match`, and whether the optimizer state holds a
        clipping stage."""
        matched = {
            f.name: value for f, value in leaf_settings(self) if f.metadata.get("must_match")
        }
        return {
            **dataclasses.asdict(self.model),
            "optimizer": self.optim.optimizer,
            "grad_clip_on": self.optim.grad_clip > 0,
            **matched,
        }

    def validate(self, device_count: int | None = None) -> None:
        """Raise `UsageError` naming the first impossible setting; cheap, before any compile."""
        _check_choices(self)
        _check_ranges(self)
        _check_combinations(self)
        if device_count is not None and self.data.global_batch % device_count:
            raise UsageError(
                f"--global_batch={self.data.global_batch} does not divide over {device_count} "
                f"devices; use a multiple of {device_count}."
            )


# --- Walking the settings --------------------------------------------------------------------


def is_section(field: dataclasses.Field) -> bool:
    return "help" not in field.metadata


def field_types(cls: type) -> dict[str, type]:
    """The fields' types, resolved (this module uses postponed annotations)."""
    return typing.get_type_hints(cls)


def leaf_fields(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field, type]]:
    """Every setting of a (nested) settings dataclass: (path of section names, field, type)."""
    leaves = []
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if is_section(f):
            leaves += [((f.name, *path), g, t) for path, g, t in leaf_fields(types[f.name])]
        else:
            leaves.append(((), f, types[f.name]))
    return leaves


def leaf_settings(obj: Any) -> list[tuple[dataclasses.Field, Any]]:
    """Every setting of a settings dataclass instance with its value."""
    out = []
    for path, f, _ in leaf_fields(type(obj)):
        section_value = obj
        for name in path:
            section_value = getattr(section_value, name)
        out.append((f, getattr(section_value, f.name)))
    return out


def replace_settings(obj: Any, changes: dict[str, Any]) -> Any:
    """`dataclasses.replace` that routes flat setting names into their sections."""
    changes = dict(changes)
    direct = {f.name: changes.pop(f.name) for f in dataclasses.fields(obj) if f.name in changes}
    types = field_types(type(obj))
    for f in dataclasses.fields(obj):
        if not is_section(f) or f.name in direct:
            continue
        names = {g.name for _, g, _ in leaf_fields(types[f.name])}
        mine = {k: changes.pop(k) for k in list(changes) if k in names}
        if mine:
            direct[f.name] = replace_settings(getattr(obj, f.name), mine)
    if changes:
        raise TypeError(f"{type(obj).__name__} has no setting {', '.join(sorted(changes))}")
    return dataclasses.replace(obj, **direct)


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """A settings dataclass from `dataclasses.asdict` output; unknown keys are an error."""
    types = field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = from_dict(types[f.name], value) if is_section(f) else value
    unknown = set(values) - set(kwargs)
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(sorted(unknown))}")
    return cls(**kwargs)


def complete_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved model or run settings, with the model settings added since filled in as they were.

    Checkpoints written before `--cell` and the ablation flags existed lack those keys; they were
    LSTMs without the ablations, so they resume and sample as such.
    """
    return {**_ADDED_MODEL_SETTINGS, **saved}


def model_config_from_settings(saved: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a checkpoint, from its saved settings (which hold more keys)."""
    settings = complete_settings(saved)
    return ModelConfig(**{f.name: settings[f.name] for f in dataclasses.fields(ModelConfig)})


# --- Validation ------------------------------------------------------------------------------

# Settings that must be > 0, and those that must be >= 0; every float must also be finite.
_POSITIVE = (
    "seq_len global_batch hidden num_layers log_every eval_every checkpoint_every "
    "keep_checkpoints learning_rate"
).split()
_NON_NEGATIVE = (
    "embed_dim num_steps warmup_steps sample_every weight_decay grad_clip length temperature"
).split()


def _check_choices(config: Config) -> None:
    for f, value in leaf_settings(config):
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UsageError(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}.")


def _check_ranges(config: Config) -> None:
    for f, value in leaf_settings(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name} must be a finite number, got {value}.")
        if f.name in _POSITIVE and not value > 0:
            raise UsageError(f"--{f.name} must be positive, got {value}.")
        if f.name in _NON_NEGATIVE and value < 0:
            raise UsageError(f"--{f.name} must be >= 0, got {value}.")
    if not 0.0 <= config.regularization.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {config.regularization.dropout}.")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise UsageError(f"--val_fraction must be in (0, 1), got {config.data.val_fraction}.")
    if config.optim.num_steps == 0 and not config.optim.num_epochs > 0:
        raise UsageError("Set --num_steps or a positive --num_epochs.")


def _check_combinations(config: Config) -> None:
    # Imported here, so that config stays free of Flax.
    from lstm_jax.cells import CELLS, cell_steps_in_scan, cell_takes_dtype

    model, compute = config.model, config.compute
    if config.optim.weight_decay > 0 and config.optim.optimizer != "adamw":
        raise UsageError("--weight_decay needs --optimizer=adamw.")
    if model.cell not in CELLS:
        raise UsageError(f"--cell must be one of {', '.join(CELLS)}, got {model.cell!r}.")
    if compute.dtype != "float32" and not cell_takes_dtype(model.cell):
        takes = ", ".join(name for name in CELLS if cell_takes_dtype(name))
        raise UsageError(
            f"--dtype={compute.dtype} needs a cell with a compute dtype ({takes}); "
            f"--cell={model.cell} computes in float32 only."
        )
    if compute.remat and not cell_steps_in_scan(model.cell):
        steppers = ", ".join(name for name in CELLS if cell_steps_in_scan(name))
        raise UsageError(
            f"--remat recomputes a step-by-step scan ({steppers}); --cell={model.cell} "
            "computes all time steps at once. Drop --remat."
        )
    if model.tie_embeddings and model.embed_dim != model.hidden:
        raise UsageError(
            "--tie_embeddings needs --embed_dim equal to --hidden (the output layer reuses "
            f"the embedding table), got --embed_dim={model.embed_dim} and "
            f"--hidden={model.hidden}."
        )
