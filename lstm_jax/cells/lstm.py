"""`lstm`: Flax's `nn.OptimizedLSTMCell`, the default cell.

Parameters keep `nn.LSTMCell`'s names (`ii`, `if`, `ig`, `io` for the input kernels, `hi`, `hf`,
`hg`, `ho` for the recurrent kernels and biases), so checkpoints move between the two cells and
the ones written before the cell registry existed still load.

`scan(..., hoist_input=True)` (`--hoist_input`) computes x @ [ii|if|ig|io] for all time steps
as one matmul before the loop, which then adds only h @ [hi|hf|hg|ho] + bias per step: the same
parameters, the same arithmetic as `__call__` up to rounding.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from lstm_jax.cells.base import Carry, Cell

GATES = ("i", "f", "g", "o")  # OptimizedLSTMCell's order of the fused kernels.


class LSTM(Cell, nn.OptimizedLSTMCell):
    """Carry: (c, h), each [batch, features]."""

    recurrent_kernels: ClassVar[tuple[str, ...]] = (
        "hi/kernel",
        "hf/kernel",
        "hg/kernel",
        "ho/kernel",
    )
    hoists_input: ClassVar[bool] = True

    @nn.nowrap
    def init_carry(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
        zeros = jnp.zeros((batch_size, self.features), jnp.float32)
        return zeros, zeros

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # The four gates' kernels, concatenated: x @ [in, 4h] and h @ [h, 4h].
        return 2 * 4 * self.features * (input_dim + self.features)

    def scan(
        self,
        carry: Carry,
        xs: jax.Array,
        remat: bool = False,
        unroll: int = 1,
        hoist_input: bool = False,
    ) -> tuple[Carry, jax.Array]:
        if not hoist_input or self.is_initializing():  # Init creates the parameters.
            return super().scan(carry, xs, remat=remat, unroll=unroll)
        # self.variables, not the module's fields: under --weight_drop, nn.map_variables hands
        # this method the dropped recurrent kernels.
        params = self.variables["params"]
        w_in = jnp.concatenate([params[f"i{gate}"]["kernel"] for gate in GATES], axis=-1)
        w_h = jnp.concatenate([params[f"h{gate}"]["kernel"] for gate in GATES], axis=-1)
        bias = jnp.concatenate([params[f"h{gate}"]["bias"] for gate in GATES], axis=-1)
        xs, w_in = promote_dtype(xs, w_in, dtype=self.dtype)
        # Time-major, as the scan reads it: one [time * batch, in] @ [in, 4 * features] matmul.
        xs = jnp.swapaxes(xs, 0, 1)
        projected = jnp.dot(xs.reshape(-1, xs.shape[-1]), w_in).reshape(*xs.shape[:2], -1)

        def step(carry, x_proj):
            c, h = carry
            h_in, kernel, b = promote_dtype(h, w_h, bias, dtype=self.dtype)
            z = jnp.dot(h_in, kernel) + b + x_proj
            i, f, g, o = jnp.split(z, 4, axis=-1)
            i, f, o = self.gate_fn(i), self.gate_fn(f), self.gate_fn(o)
            new_c = f * c + i * self.activation_fn(g)
            new_h = o * self.activation_fn(new_c)
            return (new_c, new_h), new_h

        if remat:
            step = jax.checkpoint(step, prevent_cse=False)
        carry, ys = jax.lax.scan(step, carry, projected, unroll=unroll)
        return carry, jnp.swapaxes(ys, 0, 1)
