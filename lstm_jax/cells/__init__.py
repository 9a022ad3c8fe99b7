"""Recurrent cells, and the registry that `--cell` picks from.

Every cell implements one interface, `Cell` (see `lstm_jax.cells.base`): a Flax module with a
`features` field and

    init_carry(batch_size) -> carry      the zero state: a pytree of float32 [batch, ...] arrays
    __call__(carry, x) -> (carry, y)     one time step: x [batch, in] -> y [batch, features]
    scan(carry, xs) -> (carry, ys)       the whole sequence [batch, time, in], which the model
                                         applies; by default __call__ under nn.scan (which
                                         also takes remat=True, for --remat)
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

from lstm_jax.cells import gru, lstm, lstm_ln, minlstm, mogrifier, slstm
from lstm_jax.cells.base import Carry, Cell

CELLS: dict[str, type[Cell]] = {
    "lstm": lstm.LSTM,
    "gru": gru.GRU,
    "lstm_ln": lstm_ln.LayerNormLSTM,
    "slstm": slstm.SLSTM,
    "minlstm": minlstm.MinLSTM,
    "mogrifier": mogrifier.Mogrifier,
}


def cell_steps_in_scan(name: str) -> bool:
    """Whether the cell uses the default `Cell.scan` (one step at a time), which `--remat` needs."""
    return CELLS[name].scan is Cell.scan


def cell_takes_dtype(name: str) -> bool:
    """Whether the cell has Flax's `dtype` field (compute dtype), so `--dtype` applies to it."""
    return "dtype" in {field.name for field in dataclasses.fields(CELLS[name])}


__all__ = ["CELLS", "Carry", "Cell", "cell_steps_in_scan", "cell_takes_dtype"]
