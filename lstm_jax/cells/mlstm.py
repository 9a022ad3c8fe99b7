"""`mlstm`: xLSTM's matrix-memory LSTM (Beck et al., 2024, "xLSTM", section 2.3 and appendix).

Per head (`heads` of them, each `features / heads` = d wide), from the input x_t alone:

    q_t = W_q x_t,  k_t = W_k x_t / sqrt(d),  v_t = W_v x_t      query, key, value [d]
    i~_t = w_i x_t + b_i,  f~_t = w_f x_t + b_f                  one scalar gate each
    log f_t = log sigmoid(f~_t)  (or f~_t: forget="exponential")
    m_t = max(log f_t + m_{t-1}, i~_t)                           the max-stabiliser
    i'_t = exp(i~_t - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T,   n_t = f'_t n_{t-1} + i'_t k_t
    h~_t = C_t^T q_t / max(|n_t . q_t|, exp(-m_t))
    y_t = sigmoid(W_o x_t) * (gamma * norm(h~_t))                 norm: per head, over d

C and n are the paper's memory and normaliser scaled by exp(-m_t); the ratio h~ is the
unstabilised one exactly (the lower bound 1 of |n . q| becomes exp(-m_t)), so m only keeps
exp from overflowing. No gate sees h: the recurrence is linear, and `scan` computes a chunk of
L steps at once (the xLSTM appendix's parallel form, extended by the carried state):

    b_t = log f_1 + ... + log f_t                                 within the chunk
    log D_tj = b_t - b_j + i~_j  (j <= t),   log D_t0 = b_t + m_0  (the carry)
    m_t = max_j log D_tj  (j = 0..t: equal to the recurrence's m_t)
    h~_t = (sum_j e^(log D_tj - m_t) (q_t . k_j) v_j + e^(log D_t0 - m_t) C_0^T q_t)
           / max(|the same with v_j -> 1, C_0 -> n_0|, exp(-m_t))

and the carry after the chunk is the same sums at t = L. `chunk` = 0 makes the whole sequence
one chunk (quadratic in its length); `chunk` = L scans over chunks of L (linear in the length,
quadratic in L). Carry: (C [batch, heads, d, d], n [batch, heads, d], m [batch, heads]), so
TBPTT continues exactly. Sampling steps `__call__` one character at a time; `scan` agrees with
it to float32 rounding from a carried state (tested). Gate biases start as in NX-AI/xlstm: the
forget gate's from 3 to 6 across the heads (long memory), the input gate's near 0, and h~ is
normalised per head before the output gate (NX-AI's `MultiHeadLayerNorm`, a scale and no
bias): the ratio h~ is unbounded where |n . q| is small. The rest of NX-AI's block around the
cell (up-projection, Conv1D, skip) is left to `--block`.
There is no recurrent kernel: `--weight_drop` is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell, refuse_heads_that_do_not_divide, resolve_heads

Carry = tuple[jax.Array, jax.Array, jax.Array]  # (C, n, m), stabilised by exp(-m).
FORGET_GATES = ("sigmoid", "exponential")
NORM_EPSILON = 1e-6  # Of the per-head norm of h~, as flax's LayerNorm.


def _forget_bias(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """NX-AI/xlstm's `bias_linspace_init_`: 3 to 6 across the heads, so f starts near 0.95-1."""
    return jnp.linspace(3.0, 6.0, shape[0], dtype=dtype)


class MLSTM(Cell):
    """Carry: (C [batch, heads, d, d], n [batch, heads, d], m [batch, heads]), d = width/heads."""

    features: int
    heads: int = 0  # 0: 4 where 4 divides features, else 1 (`resolve_heads`).
    chunk: int = 0  # 0: the whole sequence as one chunk (the parallel form).
    forget: str = "sigmoid"

    steps_in_scan: ClassVar[bool] = False  # A chunk's steps are computed at once.
    settings: ClassVar[tuple[str, ...]] = ("mlstm_heads", "mlstm_chunk", "mlstm_forget")

    @classmethod
    def refuse(cls, config: Any) -> None:
        refuse_heads_that_do_not_divide("mlstm_heads", config.mlstm_heads, config.hidden)

    @classmethod
    def options(cls, config: Any) -> dict[str, Any]:
        return {"heads": config.mlstm_heads, "chunk": config.mlstm_chunk,
                "forget": config.mlstm_forget}  # fmt: skip

    @nn.nowrap
    def _shape(self) -> tuple[int, int]:
        heads = resolve_heads(self.heads, self.features)
        return heads, self.features // heads

    def setup(self):
        heads, _ = self._shape()
        self.q_proj = nn.Dense(self.features)
        self.k_proj = nn.Dense(self.features)
        self.v_proj = nn.Dense(self.features)
        self.output_gate = nn.Dense(self.features)
        small = nn.initializers.normal(0.1)
        self.input_gate = nn.Dense(heads, bias_init=small)
        self.forget_gate = nn.Dense(heads, bias_init=_forget_bias)
        self.norm_scale = self.param("norm_scale", nn.initializers.ones_init(), (self.features,))

    @nn.nowrap
    def init_carry(self, batch_size: int) -> Carry:
        heads, width = self._shape()
        return (
            jnp.zeros((batch_size, heads, width, width), jnp.float32),
            jnp.zeros((batch_size, heads, width), jnp.float32),
            jnp.zeros((batch_size, heads), jnp.float32),
        )

    @nn.nowrap
    def state_flops_per_step(self) -> int:
        """The matrix memory's FLOPs, which no weight makes: per head and entry of C, the outer
        product k v^T, its scaling by i', f' C and the add (4), and the read C^T q (2)."""
        _, width = self._shape()
        return 6 * self.features * width

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # q, k, v and the output gate, features wide; the two scalar gates per head.
        heads, _ = self._shape()
        weights = 2 * input_dim * (4 * self.features + 2 * heads)
        return weights + self.state_flops_per_step()

    def _project(self, xs: jax.Array) -> tuple[jax.Array, ...]:
        """xs [..., in] -> q, k, v [..., heads, d], i~ and log f [..., heads], o [..., features]."""
        heads, width = self._shape()

        def split(a: jax.Array) -> jax.Array:
            return a.reshape(*a.shape[:-1], heads, width)

        f = self.forget_gate(xs)
        log_f = jax.nn.log_sigmoid(f) if self.forget == "sigmoid" else f
        q, k, v = (split(proj(xs)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        k = k / jnp.sqrt(width)
        return q, k, v, self.input_gate(xs), log_f, jax.nn.sigmoid(self.output_gate(xs))

    def __call__(self, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        c, n, m = carry
        q, k, v, i, log_f, o = self._project(x)
        m_new = jnp.maximum(log_f + m, i)
        forget = jnp.exp(log_f + m - m_new)[..., None]  # The stabilised forget gate.
        write = jnp.exp(i - m_new)[..., None]
        c = forget[..., None] * c + write[..., None] * (k[..., :, None] * v[..., None, :])
        n = forget * n + write * k
        numerator = jnp.einsum("bhk,bhkv->bhv", q, c)
        denominator = jnp.maximum(jnp.abs(jnp.sum(n * q, -1)), jnp.exp(-m_new))
        h = numerator / denominator[..., None]
        return (c, n, m_new), self._output(h, o)

    def _output(self, h: jax.Array, o: jax.Array) -> jax.Array:
        """h~ [..., heads, d] and the output gate o [..., features] -> y [..., features]."""
        mean = jnp.mean(h, -1, keepdims=True)
        normed = (h - mean) * jax.lax.rsqrt(jnp.var(h, -1, keepdims=True) + NORM_EPSILON)
        return o * self.norm_scale * normed.reshape(o.shape)

    def scan(self, carry: Carry, xs: jax.Array) -> tuple[Carry, jax.Array]:
        if xs.shape[1] == 1:  # Sampling: one character, one recurrent step.
            carry, y = self(carry, xs[:, 0])
            return carry, y[:, None]
        q, k, v, i, log_f, o = self._project(xs)  # All time steps: [batch, time, ...].
        steps = xs.shape[1]
        size = self.chunk if 0 < self.chunk < steps else steps
        whole = steps // size * size
        hs = []
        if whole == steps == size:  # The parallel form: the whole sequence at once.
            carry, h = _chunk(carry, q, k, v, i, log_f)
            return carry, self._output(h, o)
        if whole:  # The full chunks, one after another, each computed at once.
            parts = tuple(_cut(a[:, :whole], size) for a in (q, k, v, i, log_f))
            carry, h = jax.lax.scan(lambda carry, part: _chunk(carry, *part), carry, parts)
            hs.append(h.swapaxes(0, 1).reshape(xs.shape[0], whole, *h.shape[3:]))
        if whole < steps:  # The rest, shorter than a chunk.
            carry, h = _chunk(carry, *(a[:, whole:] for a in (q, k, v, i, log_f)))
            hs.append(h)
        h = jnp.concatenate(hs, axis=1) if len(hs) > 1 else hs[0]
        return carry, self._output(h, o)


def _cut(a: jax.Array, size: int) -> jax.Array:
    """[batch, time, ...] -> [time / size, batch, size, ...]: chunks first, for the scan."""
    return a.reshape(a.shape[0], a.shape[1] // size, size, *a.shape[2:]).swapaxes(0, 1)


def _chunk(
    carry: Carry, q: jax.Array, k: jax.Array, v: jax.Array, i: jax.Array, log_f: jax.Array
) -> tuple[Carry, jax.Array]:
    """L steps at once from the carry: q, k, v [batch, L, heads, d], i, log_f [batch, L, heads]
    -> (the carry after step L, h~ [batch, L, heads, d]). See the module docstring."""
    c0, n0, m0 = carry
    q, k, v = (a.swapaxes(1, 2) for a in (q, k, v))  # [batch, heads, L, d]
    i, log_f = i.swapaxes(1, 2), log_f.swapaxes(1, 2)  # [batch, heads, L]
    steps = q.shape[2]
    b = jnp.cumsum(log_f, axis=-1)  # The log decay from the chunk's start through step t.
    causal = jnp.tril(jnp.ones((steps, steps), bool))
    log_d = jnp.where(causal, b[..., :, None] - b[..., None, :] + i[..., None, :], -jnp.inf)
    log_carry = b + m0[..., None]  # [batch, heads, L]: the carried state's weight at step t.
    m = jnp.maximum(jnp.max(log_d, axis=-1), log_carry)
    d = jnp.exp(log_d - m[..., None])
    from_carry = jnp.exp(log_carry - m)
    scores = jnp.einsum("bhtk,bhjk->bhtj", q, k) * d
    numerator = jnp.einsum("bhtj,bhjv->bhtv", scores, v)
    numerator += from_carry[..., None] * jnp.einsum("bhtk,bhkv->bhtv", q, c0)
    denominator = jnp.sum(scores, -1) + from_carry * jnp.einsum("bhtk,bhk->bht", q, n0)
    h = numerator / jnp.maximum(jnp.abs(denominator), jnp.exp(-m))[..., None]
    # The state after the last step: its row of D, and the carry's weight there.
    last, last_carry = d[..., -1, :], from_carry[..., -1]
    c = last_carry[..., None, None] * c0 + jnp.einsum("bhj,bhjk,bhjv->bhkv", last, k, v)
    n = last_carry[..., None] * n0 + jnp.einsum("bhj,bhjk->bhk", last, k)
    return (c, n, m[..., -1]), h.swapaxes(1, 2)
