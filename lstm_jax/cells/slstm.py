"""`slstm`: the sLSTM cell of xLSTM (Beck et al., 2024, section 2.2), with exponential gating.

Input and forget gates are exponential, i = exp(i~) and f = exp(f~), so a new input can
outweigh the whole memory; a normaliser state n keeps the output a weighted mean of the
cell inputs, and a stabiliser state m (a running maximum in log space) keeps the exponentials
finite without changing the result:

    z = tanh(z~),  o = sigmoid(o~),  with [z~, i~, f~, o~] = W x_t + R h_{t-1} + b
    m_t = max(f~ + m_{t-1}, i~)
    i' = exp(i~ - m_t),  f' = exp(f~ + m_{t-1} - m_t)
    c_t = f' c_{t-1} + i' z,  n_t = f' n_{t-1} + i',  h_t = o * c_t / n_t

From a fresh (all-zero) state m_t = i~, as in the authors' code, so the first input is taken
whole. The paper's alternative sigmoid forget gate is log f = log sigmoid(f~) in place of f~.
What this cell leaves out of the paper's sLSTM block: the block-diagonal (multi-head) recurrent
matrix R (here one head, a full matrix), the causal convolution, group norm and the gated MLP
around it; add them as layers around the cell to study them.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell

SLSTMCarry = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # (c, n, m, h)


class SLSTM(Cell):
    """Carry: (c, n, m, h), each [batch, features]: cell, normaliser, stabiliser, output."""

    recurrent_kernels: ClassVar[tuple[str, ...]] = ("recurrent/kernel",)

    features: int

    @nn.nowrap
    def init_carry(self, batch_size: int) -> SLSTMCarry:
        zeros = jnp.zeros((batch_size, self.features), jnp.float32)
        return zeros, zeros, zeros, zeros

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # The four pre-activations: x @ [in, 4h] (input) and h @ [h, 4h] (recurrent).
        return 2 * 4 * self.features * (input_dim + self.features)

    @nn.compact
    def __call__(self, carry: SLSTMCarry, x: jax.Array) -> tuple[SLSTMCarry, jax.Array]:
        c, n, m, h = carry
        gates = nn.Dense(4 * self.features, name="input")(x) + nn.Dense(
            4 * self.features,
            use_bias=False,
            kernel_init=nn.initializers.orthogonal(),
            name="recurrent",
        )(h)
        z, log_i, log_f, o = jnp.split(gates, 4, axis=-1)
        fresh = n == 0  # Nothing stored yet (the start, or a reset): take the input whole.
        m_new = jnp.where(fresh, log_i, jnp.maximum(log_f + m, log_i))
        i = jnp.exp(log_i - m_new)
        # <= 0 by construction except from a fresh state, where c = n = 0 and any f' <= 1 will
        # do; the cap keeps exp (and its gradient) finite there.
        f = jnp.exp(jnp.minimum(log_f + m - m_new, 0.0))
        c = f * c + i * jnp.tanh(z)
        n = f * n + i
        h = nn.sigmoid(o) * c / n
        return (c, n, m_new, h), h
