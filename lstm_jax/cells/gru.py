"""`gru`: Flax's `nn.GRUCell` (Cho et al., 2014).

Three gates' worth of weights instead of the LSTM's four, so at the same width it has 3/4 of the
LSTM's recurrent parameters; widen it (`--hidden`) to compare at equal size.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell


class GRU(Cell, nn.GRUCell):
    """Carry: h [batch, features]."""

    recurrent_kernels: ClassVar[tuple[str, ...]] = ("hr/kernel", "hz/kernel", "hn/kernel")

    @nn.nowrap
    def init_carry(self, batch_size: int) -> jax.Array:
        return jnp.zeros((batch_size, self.features), jnp.float32)

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # Three [in, h] input kernels (ir, iz, in) and three [h, h] recurrent ones (hr, hz, hn).
        return 2 * 3 * self.features * (input_dim + self.features)
