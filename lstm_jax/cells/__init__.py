"""Recurrent cells, and the registry that `--cell` picks from.

Every cell implements one interface, `Cell` (see `lstm_jax.cells.base`): a Flax module with a
`features` field and

    init_carry(batch_size) -> carry      the zero state: a pytree of float32 [batch, ...] arrays
    __call__(carry, x) -> (carry, y)     one time step: x [batch, in] -> y [batch, features]
    scan(carry, xs) -> (carry, ys)       the whole sequence [batch, time, in], which the model
                                         applies; by default __call__ under nn.scan (which
                                         also takes remat=True and unroll=N, for
                                         --remat and --unroll)
    flops_per_step(input_dim) -> int     forward matmul FLOPs of one step for one sequence, which
                                         `lstm_jax.bench` sums into the model's FLOPs per char

`lstm_jax.models.CharLSTM` stacks `--num_layers` of the chosen cell, each `--hidden` wide and
named `{cell}_{layer}`, and does everything else (embedding, dropout, residuals, layer norm,
output layer). Training, the carried state, checkpoints and sampling only see the carry as a
pytree, so a new cell works with all of them. To add one: write `lstm_jax/cells/mycell.py`
with a `Cell` subclass and add one line to `CELLS` below (README, "Add a cell").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lstm_jax.cells import attention, gru, lstm, lstm_ln, minlstm, mlstm, mogrifier, rglru, slstm
from lstm_jax.cells.base import Carry, Cell
from lstm_jax.errors import UsageError

CELLS: dict[str, type[Cell]] = {
    "lstm": lstm.LSTM,
    "gru": gru.GRU,
    "lstm_ln": lstm_ln.LayerNormLSTM,
    "slstm": slstm.SLSTM,
    "minlstm": minlstm.MinLSTM,
    "mogrifier": mogrifier.Mogrifier,
    # Griffin's recurrent block around the RG-LRU (issue 27, item 2).
    "rglru": rglru.RGLRU,
    # xLSTM's matrix-memory LSTM, parallel or chunkwise in training (issue 27, item 1).
    "mlstm": mlstm.MLSTM,
    # Causal multi-head attention over a sliding window, rotary positions (issue 27, item 3).
    "attention": attention.Attention,
}


def cell_steps_in_scan(name: str) -> bool:
    """Whether the cell's `scan` goes one step at a time (`Cell.steps_in_scan`), which
    `--remat`, `--unroll` and `--scan=wavefront` need."""
    return CELLS[name].steps_in_scan


def cell_takes_dtype(name: str) -> bool:
    """Whether the cell has Flax's `dtype` field (compute dtype), so `--dtype` applies to it."""
    return "dtype" in {field.name for field in dataclasses.fields(CELLS[name])}


def refuse_what_the_cell_cannot_do(config: Any) -> None:
    """Raise `UsageError` where a `Config` asks of its `--cell` what the cell class lacks: a
    compute dtype, recurrent kernels to drop, or a step-by-step scan (for --remat, --unroll and
    --scan=wavefront). The capabilities come from the classes, so a new cell needs no entry."""
    model, compute = config.model, config.compute
    refuse_settings_of_other_cells(model)
    CELLS[model.cell].refuse(model)
    if compute.dtype != "float32" and not cell_takes_dtype(model.cell):
        takes = ", ".join(name for name in CELLS if cell_takes_dtype(name))
        raise UsageError(
            f"--dtype={compute.dtype} needs a cell with a compute dtype ({takes}); "
            f"--cell={model.cell} computes in float32 only."
        )
    if config.regularization.weight_drop and not CELLS[model.cell].recurrent_kernels:
        droppable = ", ".join(name for name in CELLS if CELLS[name].recurrent_kernels)
        raise UsageError(
            f"--weight_drop drops recurrent kernels ({droppable}); --cell={model.cell} has "
            "none. Drop --weight_drop."
        )
    if compute.hoist_input and not CELLS[model.cell].hoists_input:
        hoisters = ", ".join(name for name in CELLS if CELLS[name].hoists_input)
        raise UsageError(f"--hoist_input needs a cell that hoists ({hoisters}); drop it.")
    if compute.hoist_input and compute.scan == "wavefront":
        raise UsageError("--hoist_input is for --scan=layered; drop one of them.")
    stepwise = {"--remat": compute.remat, "--scan=wavefront": compute.scan == "wavefront"}
    asked = [flag for flag, on in {**stepwise, "--unroll": compute.unroll > 1}.items() if on]
    if asked and not cell_steps_in_scan(model.cell):
        steppers = ", ".join(name for name in CELLS if cell_steps_in_scan(name))
        raise UsageError(
            f"{asked[0]} needs a step-by-step scan ({steppers}); --cell={model.cell} computes "
            f"all time steps at once. Drop {asked[0]}."
        )


def refuse_settings_of_other_cells(model: Any) -> None:
    """Raise `UsageError` where a `ModelConfig` sets, away from its default, a setting that only
    another cell reads (`Cell.settings`): it would be ignored."""
    defaults = {field.name: field.default for field in dataclasses.fields(model)}
    for name, cell_type in CELLS.items():
        if name == model.cell:
            continue
        for setting in cell_type.settings:
            if getattr(model, setting) != defaults[setting]:
                raise UsageError(
                    f"--{setting} acts on --cell={name} only; add --cell={name} or drop "
                    f"--{setting}."
                )


__all__ = [
    "CELLS",
    "Carry",
    "Cell",
    "cell_steps_in_scan",
    "cell_takes_dtype",
    "refuse_settings_of_other_cells",
    "refuse_what_the_cell_cannot_do",
]
