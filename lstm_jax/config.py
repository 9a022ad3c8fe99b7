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
from typing import Any

from lstm_jax.errors import UsageError
from lstm_jax.model_config import ModelConfig  # Its own module: new cells add settings there.
from lstm_jax.settings import (  # The walkers are re-exported: config is where callers look.
    MEMBERS,
    NON_NEGATIVE,
    POSITIVE,
    RATE,
    SEED,
    Range,
    check_choices,
    check_ranges,
    field_types,  # noqa: F401
    from_dict,  # noqa: F401
    is_section,  # noqa: F401
    leaf_fields,  # noqa: F401
    leaf_settings,
    replace_settings,
    section,
    setting,
)

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw")
DROPOUT_PLACES = ("between", "output")
DTYPES = ("float32", "bfloat16")
SCANS = ("layered", "wavefront")
MEMBER_LOOPS = ("auto", "vmap", "map")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What text the model reads, and how it is cut into batches."""

    data_path: str = setting(
        "",
        "Text to train on: a file, a folder (its *.txt files, sorted) or a quoted glob "
        "('notes/**/*.txt'); several files are joined with two newlines between them. Wins "
        "over --gutenberg and --data_url. None of the three: Dracula, bundled, no network.",
    )
    gutenberg: int = setting(
        0,
        "Project Gutenberg book number to download once and train on (1342, say); 0: none.",
        within=NON_NEGATIVE,
    )
    data_url: str = setting(
        "", "URL of a plain-text Project Gutenberg book to train on; --gutenberg wins over it."
    )
    data_dir: str = setting("~/.cache/lstm_jax", "Download cache (--gutenberg, --data_url).")
    encoding: str = setting("utf-8", "Text encoding of the input files.")
    max_text_mb: float = setting(
        1024.0, "Largest text to read, in MB (2**20 bytes), all files together.", within=POSITIVE
    )
    lowercase: bool = setting(False, "Lower-case the text (smaller vocabulary).", must_match=True)
    val_fraction: float = setting(
        0.05,
        "Fraction held out for validation, just before the test part of every file: it picks "
        "the best checkpoint (and every hyperparameter).",
        must_match=True,
        within=Range(0, 1, low_open=True, high_open=True),
    )
    test_fraction: float = setting(
        0.1,
        "Fraction held out for the test: the end of every file, scored once, with the best "
        "checkpoint, at the end of a run (and by python -m lstm_jax.evaluate). 0: none.",
        must_match=True,
        within=RATE,
    )
    seq_len: int = setting(
        100, "Characters per training sequence (BPTT length).", must_match=True, within=POSITIVE
    )
    global_batch: int = setting(
        64,
        "Sequences per step over all devices; must divide by the device count.",
        must_match=True,
        within=POSITIVE,
    )
    carry_state: bool = setting(
        True,
        "Carry the recurrent state from one batch to the next (contiguous streams, char-rnn "
        "style). Off: independent random windows from a zero state.",
        must_match=True,
    )
    seed: int = setting(
        0,
        "Seed for initialisation, batches, dropout and samples; 32 bits, what JAX's random "
        "keys hold.",
        must_match=True,
        within=SEED,
    )


@dataclasses.dataclass(frozen=True)
class RegularizationConfig:
    """Regularisers active in training only; evaluation and sampling run without them."""

    dropout: float = setting(0.2, "Dropout rate; where it applies: --dropout_at.", within=RATE)
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
    embed_dropout: float = setting(
        0.0, "Drop whole characters: at each step every character's embedding row (its "
        "one-hot input without an embedding) is zeroed with this probability, in all its "
        "occurrences (AWD-LSTM's embedding dropout).", within=RATE,
    )  # fmt: skip
    input_dropout: float = setting(
        0.0, "Dropout on the first layer's input, the embedded characters (one mask per "
        "sequence with --variational_dropout).", within=RATE,
    )  # fmt: skip
    weight_drop: float = setting(
        0.0, "DropConnect on the recurrent (hidden-to-hidden) kernels, one mask per step of "
        "the optimizer shared by all time steps (AWD-LSTM's weight drop), for the cells with "
        "such kernels (all but minlstm).", within=RATE,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How the model computes: the same results up to rounding, so checkpoints move freely."""

    dtype: str = setting(
        "float32", "Compute dtype of the matmuls: bfloat16 for TPUs and GPUs (lstm and gru "
        "cells). Parameters, carried state and loss stay float32.", choices=DTYPES,
    )  # fmt: skip
    remat: bool = setting(
        False, "Recompute each time step in the backward pass instead of storing it: about 3x "
        "less step memory for long --seq_len, 3-12% slower on a CPU. Same results.",
    )  # fmt: skip
    scan: str = setting(
        "layered", "How the layers run over time. layered: one scan per layer, layers x seq_len "
        "steps in a row; wavefront: one scan, layer l at step t - l, seq_len + layers - 1 steps "
        "in a row (for latency-bound GPUs). Same results.", choices=SCANS,
    )  # fmt: skip
    unroll: int = setting(
        1,
        "Time steps per iteration of the scan's loop (its unroll factor). Same results.",
        within=POSITIVE,
    )
    hoist_input: bool = setting(
        False, "Compute every time step's input projection (x @ the input kernels) as one "
        "matmul before each layer's scan, which then adds only h @ the hidden kernels (lstm "
        "cell, --scan=layered). Same results up to rounding.",
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    optimizer: str = setting("adamw", "Optimizer.", choices=OPTIMIZERS)
    learning_rate: float = setting(2e-3, "Peak learning rate.", within=POSITIVE)
    weight_decay: float = setting(0.01, "Decoupled weight decay (adamw).", within=NON_NEGATIVE)
    warmup_steps: int = setting(
        100, "Steps of linear learning-rate warm-up from 0.", within=NON_NEGATIVE
    )
    schedule: str = setting(
        "cosine",
        "After warm-up: constant, or cosine decay to 10% of the peak at the last step.",
        choices=SCHEDULES,
    )
    grad_clip: float = setting(
        5.0, "Clip gradients to this global norm; 0 turns clipping off.", within=NON_NEGATIVE
    )
    num_steps: int = setting(
        0, "Training steps; 0: --num_epochs passes over the text.", within=NON_NEGATIVE
    )
    num_epochs: float = setting(
        12.0, "Passes over the training text, used when --num_steps=0.", within=NON_NEGATIVE
    )
    ema_decay: float = setting(
        0.0, "Keep an exponential moving average of the parameters with this decay (0.999, "
        "say; warmed up as min(decay, (1 + step) / (10 + step))), evaluated beside them; the "
        "better of the two on validation is the checkpoint's model. 0: off.", within=RATE,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Where the run lives and what it does besides training steps."""

    workdir: str = setting(
        "runs/default",
        "Run folder: checkpoints, metrics.jsonl, flags.txt. Running the same command again "
        "resumes from it.",
    )
    log_every: int = setting(50, "Log progress every N steps.", within=POSITIVE)
    eval_every: int = setting(
        200, "Evaluate on the whole validation text every N steps.", within=POSITIVE
    )
    checkpoint_every: int = setting(
        200,
        "Save a checkpoint (after a validation run) every N steps, and always at the end.",
        within=POSITIVE,
    )
    keep_checkpoints: int = setting(
        2, "Latest checkpoints to keep, besides the best one.", within=POSITIVE
    )
    sample_every: int = setting(
        0, "Print a sample every N steps; 0: only at the end.", within=NON_NEGATIVE
    )
    restart: bool = setting(
        False, "Set aside the checkpoints in --workdir (renamed, not deleted); start afresh."
    )


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Starting a new run from another run's parameters (fine-tuning)."""

    init_from: str = setting(
        "",
        "Start a new run from the parameters of a checkpoint: WORKDIR, WORKDIR:best (the "
        "default), WORKDIR:latest or WORKDIR:STEP. Fresh optimizer and schedule; the model "
        "settings come from the checkpoint. Only for a fresh start: a --workdir that already "
        "holds checkpoints resumes them as usual.",
    )
    extend_vocab: bool = setting(
        False,
        "With --init_from: add the text's characters that the checkpoint lacks to its "
        "vocabulary (new embedding rows and output columns, the learnt ones kept). Off: "
        "such characters are an error.",
    )


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The text generated from a model: by `main` for its log, and by `sample`."""

    prompt: str = setting(
        "",
        "Text to start generating from. Empty: a newline (sample) or a random 100-character "
        "window of the validation text (main).",
    )
    length: int = setting(300, "Characters to generate.", within=POSITIVE)
    temperature: float = setting(
        0.8, "Sampling temperature; 0 is greedy argmax.", within=NON_NEGATIVE
    )


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """Many runs in one job, trained together (`lstm_jax.population`)."""

    seeds: int = setting(
        1,
        "Train this many seeds together, --seed, --seed+1, ...: each a whole run of its own, "
        "all in one jitted step; results.json gives their mean and spread.",
        must_match=True,
        within=MEMBERS,
    )
    grid: str = setting(
        "",
        "Settings to train together, every combination (times --seeds): "
        "'learning_rate=0.002,0.004;weight_drop=0.3,0.4'. Only settings that keep the "
        "program: learning_rate, weight_decay, warmup_steps, grad_clip, ema_decay, dropout, "
        "weight_drop, embed_dropout, input_dropout. Empty: none.",
        must_match=True,
    )
    member_loop: str = setting(
        "auto", "How a step runs the members. vmap: batched together, which fills an "
        "accelerator; map: one after another, which XLA:CPU runs faster than its batched "
        "matmuls; auto: map on a CPU, vmap elsewhere. Same results to float32 rounding.",
        choices=MEMBER_LOOPS,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Defaults are the headline model."""

    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    regularization: RegularizationConfig = section(RegularizationConfig)
    compute: ComputeConfig = section(ComputeConfig)
    optim: OptimConfig = section(OptimConfig)
    loop: LoopConfig = section(LoopConfig)
    init: InitConfig = section(InitConfig)
    sample: SampleConfig = section(SampleConfig)
    population: PopulationConfig = section(PopulationConfig)

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
            "ema_on": self.optim.ema_decay > 0,
            **matched,
        }

    def validate(self, device_count: int | None = None) -> None:
        """Raise `UsageError` naming the first impossible setting; cheap, before any compile."""
        check_choices(self)
        check_ranges(self)
        from lstm_jax.checks import check_combinations  # Free of Flax until needed.

        check_combinations(self)
        if device_count is not None and self.data.global_batch % device_count:
            raise UsageError(
                f"--global_batch={self.data.global_batch} does not divide over {device_count} "
                f"devices; use a multiple of {device_count}."
            )


def complete_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved model or run settings, with the model settings added since filled in as they were.

    Checkpoints written before a model setting existed lack its key; they behaved as its default
    does (a new setting's default must keep the old behaviour), so they resume and sample so.
    Checkpoints from before `--cell` and the ablation flags are LSTMs without the ablations.
    """
    defaults = dataclasses.asdict(ModelConfig())
    return {**defaults, **_SETTINGS_BEFORE_THEY_EXISTED, **saved}


# Run settings added after checkpoints were first written, as those checkpoints behaved: before
# --test_fraction, validation was the end of the text and there was no test part.
# Before populations, every run was one: one seed, no grid.
_SETTINGS_BEFORE_THEY_EXISTED = {"test_fraction": 0.0, "ema_on": False, "seeds": 1, "grid": ""}


def model_config_from_settings(saved: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a checkpoint, from its saved settings (which hold more keys)."""
    settings = complete_settings(saved)
    return ModelConfig(**{f.name: settings[f.name] for f in dataclasses.fields(ModelConfig)})
