"""`lstm_ln`: the LSTM with layer normalisation of Ba, Kiros and Hinton (2016), section 3.1.

The input and recurrent contributions to the gates are normalised separately, over all four
gates' pre-activations together, and the cell state is normalised before the output's tanh:

    i, f, o, g = LN(W_x x_t) + LN(W_h h_{t-1})      (the input LN's shift is the gates' bias)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(LN(c_t))

The carried c_t itself is not normalised. Normalisation is over features, never over the batch,
so a step does not depend on the other sequences in the batch.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell


class LayerNormLSTM(Cell):
    """Carry: (c, h), each [batch, features]."""

    recurrent_kernels: ClassVar[tuple[str, ...]] = ("recurrent/kernel",)

    features: int

    @nn.nowrap
    def init_carry(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
        zeros = jnp.zeros((batch_size, self.features), jnp.float32)
        return zeros, zeros

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # x @ [in, 4h] and h @ [h, 4h]; the three layer norms are elementwise, not counted.
        return 2 * 4 * self.features * (input_dim + self.features)

    @nn.compact
    def __call__(
        self, carry: tuple[jax.Array, jax.Array], x: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        c, h = carry
        gates_x = nn.Dense(4 * self.features, use_bias=False, name="input")(x)
        gates_h = nn.Dense(
            4 * self.features,
            use_bias=False,
            kernel_init=nn.initializers.orthogonal(),
            name="recurrent",
        )(h)
        # One shift (the input LN's) is the gates' bias; a second would be redundant.
        gates = nn.LayerNorm(name="norm_input")(gates_x) + nn.LayerNorm(
            use_bias=False, name="norm_recurrent"
        )(gates_h)
        i, f, o, g = jnp.split(gates, 4, axis=-1)
        c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
        h = nn.sigmoid(o) * jnp.tanh(nn.LayerNorm(name="norm_cell")(c))
        return (c, h), h
