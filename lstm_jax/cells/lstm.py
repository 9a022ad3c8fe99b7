"""`lstm`: Flax's `nn.OptimizedLSTMCell`, the default cell.

Parameters keep `nn.LSTMCell`'s names (`ii`, `if`, `ig`, `io` for the input kernels, `hi`, `hf`,
`hg`, `ho` for the recurrent kernels and biases), so checkpoints move between the two cells and
the ones written before the cell registry existed still load.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell


class LSTM(Cell, nn.OptimizedLSTMCell):
    """Carry: (c, h), each [batch, features]."""

    recurrent_kernels: ClassVar[tuple[str, ...]] = (
        "hi/kernel",
        "hf/kernel",
        "hg/kernel",
        "ho/kernel",
    )

    @nn.nowrap
    def init_carry(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
        zeros = jnp.zeros((batch_size, self.features), jnp.float32)
        return zeros, zeros

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # The four gates' kernels, concatenated: x @ [in, 4h] and h @ [h, 4h].
        return 2 * 4 * self.features * (input_dim + self.features)
