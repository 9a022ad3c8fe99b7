"""`rglru`: Griffin's recurrent block around the RG-LRU (De et al., 2024, "Griffin").

Two branches of the input x_t, multiplied, then projected back to `features`:

    gate_t = gelu(W_y x_t)                                    the GeLU branch
    u_t = W_x x_t;  c_t = sum_k w_k * u_{t-k} + b_conv        a causal depthwise Conv1D over
                                                              the last `conv_width` u's
    r_t = sigmoid(W_a c_t),  i_t = sigmoid(W_i c_t)           recurrence and input gates
    a_t = sigmoid(Lambda) ** (8 r_t)                          so log a_t = -8 r_t softplus(-Lambda)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t**2) * (i_t * c_t)      the RG-LRU, diagonal in h
    y_t = W_out (h_t * gate_t)

Lambda starts with sigmoid(Lambda) between 0.9 and 0.999 (uniform in area on that ring, as
recurrentgemma's `rnn_param_init`, the reference JAX code), and the square root's gradient is
capped at 1000 where a_t -> 1 (recurrentgemma's `sqrt_bound_derivative`). The gates are full
`features` x `features` matmuls (recurrentgemma's block-diagonal ones with a single block), and
there is no reset at a document start: the state is carried from batch to batch, as for every
cell here.

Carry: (h [batch, features], the last conv_width - 1 conv inputs u [batch, conv_width - 1,
features]), so a carried state continues the convolution exactly. No gate sees h, so the
recurrence is linear and `scan` runs in parallel over time: `jax.lax.associative_scan` over the
maps h -> a_t h + b_t. Sampling steps `__call__` one character at a time; `scan` agrees with it
to float32 rounding (tested). There is no recurrent kernel: `--weight_drop` is refused.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell

GATE_POWER = 8.0  # Griffin's c: a_t = sigmoid(Lambda) ** (c r_t).
MAX_SQRT_GRADIENT = 1000.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sqrt_bounded_gradient(x: jax.Array, max_gradient: float) -> jax.Array:
    """sqrt(x), with a gradient of at most `max_gradient` (sqrt's is infinite at 0)."""
    return jnp.sqrt(x)


def _sqrt_forward(x: jax.Array, max_gradient: float) -> tuple[jax.Array, jax.Array]:
    return jnp.sqrt(x), x


def _sqrt_backward(max_gradient: float, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    # d sqrt(x) / dx = 1 / (2 sqrt(x)) reaches max_gradient at x = 1 / (4 max_gradient^2).
    return (g / (2 * jnp.sqrt(jnp.maximum(x, 1 / (4 * max_gradient**2)))),)


_sqrt_bounded_gradient.defvjp(_sqrt_forward, _sqrt_backward)


def _ring_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Lambda with sigmoid(Lambda) uniform in area on the ring [0.9, 0.999] (radius^2 uniform),
    as recurrentgemma's `rnn_param_init`: a_t = sigmoid(Lambda)^(8 r_t) starts in
    [0.9^8, 0.999^8] = [0.43, 0.99] at r_t = 1, and nearer 1 as r_t falls."""
    low, high = 0.9**2, 0.999**2
    base = jnp.sqrt(jax.random.uniform(key, shape) * (high - low) + low)  # sigmoid(Lambda)
    return (jnp.log(base) - jnp.log1p(-base)).astype(dtype)  # logit(base)


def _compose(earlier, later):
    """The map 'earlier, then later', each h -> a h + b."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


class RGLRU(Cell):
    """Carry: (h [batch, features], conv inputs [batch, conv_width - 1, features])."""

    features: int
    conv_width: int = 4

    steps_in_scan: ClassVar[bool] = False  # The parallel scan computes all steps at once.

    @classmethod
    def options(cls, config: Any) -> dict[str, Any]:
        return {"conv_width": config.rglru_conv_width}

    def setup(self):
        width = self.features
        self.linear_y = nn.Dense(width)  # The GeLU branch.
        self.linear_x = nn.Dense(width)  # Into the convolution and the RG-LRU.
        # Depthwise: one weight per (time offset, unit); index conv_width - 1 is the current u.
        conv_init = nn.initializers.variance_scaling(0.01, "fan_in", "normal")
        self.conv_kernel = self.param("conv_kernel", conv_init, (self.conv_width, width))
        self.conv_bias = self.param("conv_bias", nn.initializers.zeros_init(), (width,))
        self.recurrence_gate = nn.Dense(width)
        self.input_gate = nn.Dense(width)
        self.a_param = self.param("a_param", _ring_init, (width,))  # Griffin's Lambda.
        self.linear_out = nn.Dense(width)

    @nn.nowrap
    def init_carry(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
        h = jnp.zeros((batch_size, self.features), jnp.float32)
        return h, jnp.zeros((batch_size, self.conv_width - 1, self.features), jnp.float32)

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        # linear_x and linear_y from the input; the two gates and linear_out, features wide. The
        # depthwise conv and the recurrence are elementwise (O(features)), not counted.
        return 2 * self.features * (2 * input_dim + 3 * self.features)

    def _coefficients(self, c: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The conv output c [..., features] -> (a_t, b_t) of the map h -> a_t h + b_t."""
        r = jax.nn.sigmoid(self.recurrence_gate(c))
        i = jax.nn.sigmoid(self.input_gate(c))
        log_a = -GATE_POWER * r * jax.nn.softplus(-self.a_param)  # log(sigmoid(Lambda)^(8 r))
        # 1 - a^2 = -expm1(2 log a): exact where a is close to 1.
        scale = _sqrt_bounded_gradient(-jnp.expm1(2 * log_a), MAX_SQRT_GRADIENT)
        return jnp.exp(log_a), scale * (i * c)

    def __call__(
        self, carry: tuple[jax.Array, jax.Array], x: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        h, conv_inputs = carry
        window = jnp.concatenate([conv_inputs, self.linear_x(x)[:, None]], axis=1)
        c = jnp.einsum("bkf,kf->bf", window, self.conv_kernel) + self.conv_bias
        a, b = self._coefficients(c)
        h = a * h + b
        y = self.linear_out(h * nn.gelu(self.linear_y(x)))
        return (h, window[:, 1:]), y

    def scan(
        self, carry: tuple[jax.Array, jax.Array], xs: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        if xs.shape[1] == 1:  # Sampling: one character, one step.
            carry, y = self(carry, xs[:, 0])
            return carry, y[:, None]
        h0, conv_inputs = carry
        steps = xs.shape[1]
        u = jnp.concatenate([conv_inputs, self.linear_x(xs)], axis=1)  # [b, width - 1 + T, f]
        # c_t = sum_k kernel[k] * u_{t - (width - 1) + k}: one shifted slice per kernel row.
        c = self.conv_bias + sum(
            u[:, k : k + steps] * self.conv_kernel[k] for k in range(self.conv_width)
        )
        a, b = self._coefficients(c)
        a_to_t, b_to_t = jax.lax.associative_scan(_compose, (a, b), axis=1)
        hs = a_to_t * h0[:, None] + b_to_t  # h_t = (a_t ... a_1) h_0 + the inputs since.
        ys = self.linear_out(hs * nn.gelu(self.linear_y(xs)))
        return (hs[:, -1], u[:, steps:]), ys
