"""`attention`: causal multi-head self-attention over a sliding window, with rotary positions.

The baseline a reviewer asks for first: a layer of a small local-attention transformer (as
Griffin's local attention, De et al., 2024), in the place of a recurrent cell. Per head
(`heads` of them, each d = `features / heads` wide), position t attends to positions
t - W + 1 .. t, itself included (W = `window`):

    q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t                    split into heads
    s_tj = (R_t q_t) . (R_j k_j) / sqrt(d)                       for t - W < j <= t
    y_t = W_o concat_heads(sum_j softmax_j(s_tj) v_j)

R_t is the rotary embedding (Su et al., 2021, "RoFormer"): pair i of a head's d features (i
and i + d/2) turned by the angle t * 10000^(-2i/d); an odd d leaves its last feature as it is.
So s_tj depends on t - j only, and positions can be counted from anywhere.

Carry: (keys [batch, W, features], values [batch, W, features], valid [batch, W]): the
projections of the last W positions, oldest first, keys before rotation, and 1 where a position
holds a character (0 before the first, so the zero carry is an empty window). `scan` takes a
whole chunk at once: the carried W positions and the chunk's T side by side, numbered 0 .. W +
T - 1, with a mask that lets each query see the valid positions of its window only; the new
carry is the last W of them. TBPTT across batches, evaluation in streams, dynamic evaluation
and sampling (T = 1, the same code) carry the window as the recurrent cells carry their state:
a chunked pass equals one pass over the whole sequence and equals stepping (tested). There is
no recurrent kernel (`--weight_drop` is refused) and no step-by-step scan (`--remat`,
`--unroll`, `--scan=wavefront` are refused).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell, refuse_heads_that_do_not_divide, resolve_heads

Carry = tuple[jax.Array, jax.Array, jax.Array]  # (keys, values, valid) of the last W positions.
DEFAULT_WINDOW = 128  # Characters, where --attention_window is 0.
ROTARY_BASE = 10000.0


def rotate(x: jax.Array, positions: jax.Array) -> jax.Array:
    """The rotary embedding: x [..., time, heads, d], positions [time] -> x with feature pair
    (i, i + d/2) of each head turned by positions * ROTARY_BASE^(-2i/d) (odd d: the last
    feature unturned)."""
    half = x.shape[-1] // 2
    frequencies = ROTARY_BASE ** (-jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    angles = positions.astype(jnp.float32)[:, None, None] * frequencies  # [time, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    first, second, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    turned = [first * cos - second * sin, first * sin + second * cos, rest]
    return jnp.concatenate(turned, axis=-1)


class Attention(Cell):
    """Carry: (keys, values [batch, window, features], valid [batch, window])."""

    features: int
    window: int = 0  # 0: DEFAULT_WINDOW.
    heads: int = 0  # 0: 4 where 4 divides features, else 1 (`resolve_heads`).

    steps_in_scan: ClassVar[bool] = False  # A chunk's positions are computed at once.
    settings: ClassVar[tuple[str, ...]] = ("attention_window", "attention_heads")

    @classmethod
    def options(cls, config: Any) -> dict[str, Any]:
        return {"window": config.attention_window, "heads": config.attention_heads}

    @classmethod
    def refuse(cls, config: Any) -> None:
        refuse_heads_that_do_not_divide("attention_heads", config.attention_heads, config.hidden)

    @nn.nowrap
    def _window(self) -> int:
        return self.window or DEFAULT_WINDOW

    def setup(self):
        self.q_proj = nn.Dense(self.features)
        self.k_proj = nn.Dense(self.features)
        self.v_proj = nn.Dense(self.features)
        self.out_proj = nn.Dense(self.features)

    @nn.nowrap
    def init_carry(self, batch_size: int) -> Carry:
        cache = jnp.zeros((batch_size, self._window(), self.features), jnp.float32)
        return cache, cache, jnp.zeros((batch_size, self._window()), jnp.float32)

    @nn.nowrap
    def state_flops_per_step(self) -> int:
        """Attention over the window, which no weight makes, as one step computes it: the
        scores q . k and the weighted sum of the values (2 FLOPs per feature and position
        each), and the rotation of the carried keys to their place in the window (3 per
        feature and position: the keys are kept unrotated, so positions count from the window's
        start and stay exact over any length of text)."""
        return 7 * self._window() * self.features

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # q, k, v from the input, the output projection from the heads.
        weights = 2 * self.features * (3 * input_dim + self.features)
        return weights + self.state_flops_per_step()

    def __call__(self, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
        carry, y = self.scan(carry, x[:, None])
        return carry, y[:, 0]

    def scan(self, carry: Carry, xs: jax.Array) -> tuple[Carry, jax.Array]:
        heads, window = resolve_heads(self.heads, self.features), self._window()
        cached_keys, cached_values, cached_valid = carry
        batch, steps = xs.shape[:2]
        keys = jnp.concatenate([cached_keys, self.k_proj(xs)], axis=1)  # [batch, W + T, f]
        values = jnp.concatenate([cached_values, self.v_proj(xs)], axis=1)
        valid = jnp.concatenate([cached_valid, jnp.ones((batch, steps), jnp.float32)], axis=1)

        def split(a: jax.Array) -> jax.Array:
            return a.reshape(*a.shape[:2], heads, self.features // heads)

        positions = jnp.arange(window + steps)  # The cache's, then the chunk's.
        q = rotate(split(self.q_proj(xs)), positions[window:])
        k = rotate(split(keys), positions)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1])
        distance = positions[window:, None] - positions[None, :]  # [T, W + T]: query - key.
        allowed = (distance >= 0) & (distance < window)
        allowed = allowed[None, None] & (valid[:, None, None, :] > 0)
        weights = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
        attended = jnp.einsum("bhts,bshd->bthd", weights, split(values))
        ys = self.out_proj(attended.reshape(batch, steps, self.features))
        return (keys[:, -window:], values[:, -window:], valid[:, -window:]), ys
