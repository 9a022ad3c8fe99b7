"""`minlstm`: minLSTM from "Were RNNs All We Needed?" (Feng et al., 2024), in log space.

The gates see only the input, never the previous state, so the recurrence is linear in h and
training runs in parallel over time:

    f = sigmoid(k_f),  i = sigmoid(k_i),  h~ = g(k_h),  with [k_f, k_i, k_h] = W x_t + b
    h_t = f' h_{t-1} + i' h~,  with f' = f / (f + i),  i' = i / (f + i)

where g(k) = k + 0.5 for k >= 0 and sigmoid(k) below keeps h~ positive. `scan` computes every
h_t at once with `jax.lax.associative_scan` over the pairs (log a_t, log b_t) = (log f',
log i' + log h~) of the maps h -> a_t h + b_t, composing two maps as
(la1, lb1) then (la2, lb2) = (la1 + la2, logaddexp(la2 + lb1, lb2)): a depth log(T) tree of
adds and logaddexps instead of T dependent steps, in log space so products of many gates
neither underflow nor lose precision. The starting state enters linearly,
h_t = exp(LA_t) h_0 + exp(LB_t), so any carry works, negative or zero included. Sampling steps
`__call__` one character at a time; `scan` agrees with it to float32 rounding (tested).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell


def _log_g(k: jax.Array) -> jax.Array:
    """log g(k): log(k + 0.5) for k >= 0, log sigmoid(k) below."""
    return jnp.where(k >= 0, jnp.log(jax.nn.relu(k) + 0.5), -jax.nn.softplus(-k))


def _compose(earlier, later):
    """The map 'earlier, then later', each h -> exp(la) h + exp(lb), in log space."""
    la1, lb1 = earlier
    la2, lb2 = later
    return la1 + la2, jnp.logaddexp(la2 + lb1, lb2)


class MinLSTM(Cell):
    """Carry: h [batch, features]."""

    steps_in_scan: ClassVar[bool] = False  # The parallel scan computes all steps at once.

    features: int

    def setup(self):
        # One matmul for the three pre-activations (forget, input, candidate).
        self.gates = nn.Dense(3 * self.features)

    @nn.nowrap
    def init_carry(self, batch_size: int) -> jax.Array:
        return jnp.zeros((batch_size, self.features), jnp.float32)

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # x @ [in, 3h] only: no gate sees h, so there is no recurrent matmul; the parallel scan's
        # log-space combines are elementwise (O(h) per step), not counted.
        return 2 * 3 * self.features * input_dim

    def _log_coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [..., in] -> (log f', log i' + log h~), each [..., features]."""
        k_f, k_i, k_h = jnp.split(self.gates(x), 3, axis=-1)
        # log f' = -log(1 + i/f) and log i' = -log(1 + f/i), with log(i/f) from log sigmoids.
        diff = jax.nn.softplus(-k_f) - jax.nn.softplus(-k_i)
        return -jax.nn.softplus(diff), -jax.nn.softplus(-diff) + _log_g(k_h)

    def __call__(self, carry: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        log_a, log_b = self._log_coefficients(x)
        h = jnp.exp(log_a) * carry + jnp.exp(log_b)
        return h, h

    def scan(self, carry: jax.Array, xs: jax.Array) -> tuple[jax.Array, jax.Array]:
        if xs.shape[1] == 1:  # Sampling: one character, one step.
            h, y = self(carry, xs[:, 0])
            return h, y[:, None]
        log_a, log_b = self._log_coefficients(xs)
        log_a, log_b = jax.lax.associative_scan(_compose, (log_a, log_b), axis=1)
        hs = jnp.exp(log_a) * carry[:, None] + jnp.exp(log_b)
        return hs[:, -1], hs
