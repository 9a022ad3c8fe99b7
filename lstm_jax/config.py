"""The run configuration: one frozen dataclass that every library function takes.

Only the command-line modules read absl flags; they build a `Config` and pass it on,
so tests and notebooks call the library with a `Config` and never touch flags.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Defaults are the headline model."""

    # Data.
    data_path: str = ""  # Local text file; empty means download Gutenberg #345.
    data_dir: str = "~/.cache/lstm_jax"  # Download cache.
    data_url: str = "https://www.gutenberg.org/cache/epub/345/pg345.txt"
    encoding: str = "utf-8"
    lowercase: bool = False
    val_fraction: float = 0.1
    seq_len: int = 100
    global_batch: int = 64
    carry_state: bool = True
    seed: int = 0

    # Model.
    cell: str = "lstm"  # A key of lstm_jax.cells.CELLS.
    embed_dim: int = 64  # 0: one-hot characters, no embedding table.
    hidden: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    dropout_at: str = "between"  # Between layers and before the output layer, or "output" only.
    variational_dropout: bool = False  # One mask per sequence, shared by all its time steps.
    residual: bool = False  # Skip connections around every layer after the first.
    layer_norm: bool = False  # LayerNorm on every layer's output.
    tie_embeddings: bool = False  # The output layer reuses the embedding table.
    # Compute dtype of the matmuls; parameters, carried state and loss stay float32, so it is
    # not a model setting: checkpoints move freely between dtypes.
    dtype: str = "float32"
    # Recompute each time step in the backward pass instead of storing its intermediate values
    # (about 3x less step memory, 3-12% slower on a CPU). Results are the same, so it is
    # not a model setting either.
    remat: bool = False

    # Optimisation.
    optimizer: str = "adamw"
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"
    grad_clip: float = 5.0
    num_steps: int = 0  # 0: use num_epochs.
    num_epochs: float = 12.0

    # Loop and outputs.
    workdir: str = "runs/default"
    log_every: int = 50
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: only at the end.
    sample_length: int = 300
    sample_temperature: float = 0.8
    sample_prompt: str = ""  # Empty: a random 100-character window of the validation text.
    restart: bool = False

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def model_settings(self) -> dict[str, Any]:
        """Settings that fix the parameters' shapes and meaning: a checkpoint fits only these."""
        return {
            "embed_dim": self.embed_dim,
            "hidden": self.hidden,
            "num_layers": self.num_layers,
            "cell": self.cell,
            "residual": self.residual,
            "layer_norm": self.layer_norm,
            "tie_embeddings": self.tie_embeddings,
        }

    def run_settings(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run it continues (besides the vocabulary)."""
        return {
            **self.model_settings(),
            # These two decide the optimizer state's structure.
            "optimizer": self.optimizer,
            "grad_clip_on": self.grad_clip > 0,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "carry_state": self.carry_state,
            "lowercase": self.lowercase,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }

    def validate(self, device_count: int | None = None) -> None:
        """Raise `UsageError` naming the first impossible setting; cheap, before any compile."""
        positive = {
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "hidden": self.hidden,
            "num_layers": self.num_layers,
            "log_every": self.log_every,
            "eval_every": self.eval_every,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "learning_rate": self.learning_rate,
        }
        for name, value in positive.items():
            if not value > 0:
                raise UsageError(f"--{name} must be positive, got {value}.")
        non_negative = {
            "embed_dim": self.embed_dim,
            "num_steps": self.num_steps,
            "warmup_steps": self.warmup_steps,
            "sample_every": self.sample_every,
            "sample_length": self.sample_length,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "sample_temperature": self.sample_temperature,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise UsageError(f"--{name} must be >= 0, got {value}.")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.num_steps == 0 and not self.num_epochs > 0:
            raise UsageError("Set --num_steps or a positive --num_epochs.")
        if self.schedule not in SCHEDULES:
            raise UsageError(
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(
                f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}."
            )
        if self.weight_decay > 0 and self.optimizer != "adamw":
            raise UsageError("--weight_decay needs --optimizer=adamw.")
        # Imported here, so that config stays free of Flax.
        from lstm_jax.cells import CELLS, cell_steps_in_scan, cell_takes_dtype

        if self.cell not in CELLS:
            raise UsageError(f"--cell must be one of {', '.join(CELLS)}, got {self.cell!r}.")
        if self.dropout_at not in DROPOUT_PLACES:
            raise UsageError(
                f"--dropout_at must be one of {', '.join(DROPOUT_PLACES)}, got {self.dropout_at!r}."
            )
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.dtype != "float32" and not cell_takes_dtype(self.cell):
            takes = ", ".join(name for name in CELLS if cell_takes_dtype(name))
            raise UsageError(
                f"--dtype={self.dtype} needs a cell with a compute dtype ({takes}); "
                f"--cell={self.cell} computes in float32 only."
            )
        if self.remat and not cell_steps_in_scan(self.cell):
            steppers = ", ".join(name for name in CELLS if cell_steps_in_scan(name))
            raise UsageError(
                f"--remat recomputes a step-by-step scan ({steppers}); --cell={self.cell} "
                "computes all time steps at once. Drop --remat."
            )
        if self.tie_embeddings and self.embed_dim != self.hidden:
            raise UsageError(
                "--tie_embeddings needs --embed_dim equal to --hidden (the output layer reuses "
                f"the embedding table), got --embed_dim={self.embed_dim} and "
                f"--hidden={self.hidden}."
            )
        if device_count is not None and self.global_batch % device_count:
            raise UsageError(
                f"--global_batch={self.global_batch} does not divide over {device_count} devices; "
                f"use a multiple of {device_count}."
            )


def complete_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved model or run settings, with the model settings added since filled in as they were.

    Checkpoints written before `--cell` and the ablation flags existed lack those keys; they were
    LSTMs without the ablations, so they resume and sample as such.
    """
    return {**_ADDED_MODEL_SETTINGS, **saved}
