"""Experiment (not kept): an LSTM layer with a hand-written backward pass vs autodiff of the scan.

Times forward + backward of one LSTM layer (batch 64, 100 steps, input 64) three ways, after
checking all three give the same gradients:

- `autodiff`: `jax.grad` of a `lax.scan` over the `nn.OptimizedLSTMCell` step (what the model
  trains with);
- `fused_saved_gates`: `jax.custom_vjp`; the forward scan saves the gate activations, the
  reverse scan carries only the state gradients, and the weight gradients are ONE matmul each
  over all time steps (cuDNN's and oneDNN's scheme);
- `fused_recomputed_gates`: the same, but the forward saves only (c, h) and the backward
  recomputes all gates with one large matmul before its reverse scan.

    python experiments/perf/fused_backward.py --hidden=256
    python experiments/perf/fused_backward.py --hidden=512

Results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

BATCH, TIME, INPUT = 64, 100, 64


def _gates(z):
    i, f, g, o = jnp.split(z, 4, axis=-1)
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def autodiff(wi, wh, b, c0, h0, xs):
    def step(carry, x):
        c, h = carry
        i, f, g, o = _gates(x @ wi + h @ wh + b)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), h

    return jax.lax.scan(step, (c0, h0), xs)


def _backward(wi, wh, xs, c0, h0, cs, hs, gates, d_c_last, d_h_last, d_hs):
    """Reverse scan over the state gradients; then the weight gradients as single matmuls."""
    time_steps, batch, _ = xs.shape
    previous_cs = jnp.concatenate([c0[None], cs[:-1]])
    previous_hs = jnp.concatenate([h0[None], hs[:-1]])
    wh_t = wh.T

    def step(carry, per_step):
        d_c_next, d_h_next = carry
        d_h_out, c, c_prev, i, f, g, o = per_step
        d_h = d_h_out + d_h_next
        tanh_c = jnp.tanh(c)
        d_c = d_c_next + d_h * o * (1 - tanh_c * tanh_c)
        d_z = jnp.concatenate(
            [
                d_c * g * i * (1 - i),
                d_c * c_prev * f * (1 - f),
                d_c * i * (1 - g * g),
                d_h * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )
        return (d_c * f, d_z @ wh_t), d_z

    (d_c0, d_h0), d_zs = jax.lax.scan(
        step, (d_c_last, d_h_last), (d_hs, cs, previous_cs, *gates), reverse=True
    )
    rows = d_zs.reshape(time_steps * batch, -1)
    return (
        xs.reshape(time_steps * batch, -1).T @ rows,
        previous_hs.reshape(time_steps * batch, -1).T @ rows,
        rows.sum(axis=0),
        d_c0,
        d_h0,
        (rows @ wi.T).reshape(xs.shape),
    )


@jax.custom_vjp
def fused_saved_gates(wi, wh, b, c0, h0, xs):
    return autodiff(wi, wh, b, c0, h0, xs)


def _saved_fwd(wi, wh, b, c0, h0, xs):
    def step(carry, x):
        c, h = carry
        i, f, g, o = _gates(x @ wi + h @ wh + b)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), (c, h, i, f, g, o)

    carry, (cs, hs, *gates) = jax.lax.scan(step, (c0, h0), xs)
    return (carry, hs), (wi, wh, c0, h0, xs, cs, hs, gates)


def _saved_bwd(residuals, grads):
    wi, wh, c0, h0, xs, cs, hs, gates = residuals
    (d_c_last, d_h_last), d_hs = grads
    return _backward(wi, wh, xs, c0, h0, cs, hs, gates, d_c_last, d_h_last, d_hs)


fused_saved_gates.defvjp(_saved_fwd, _saved_bwd)


@jax.custom_vjp
def fused_recomputed_gates(wi, wh, b, c0, h0, xs):
    return autodiff(wi, wh, b, c0, h0, xs)


def _recomputed_fwd(wi, wh, b, c0, h0, xs):
    def step(carry, x):
        c, h = carry
        i, f, g, o = _gates(x @ wi + h @ wh + b)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), (c, h)

    carry, (cs, hs) = jax.lax.scan(step, (c0, h0), xs)
    return (carry, hs), (wi, wh, b, c0, h0, xs, cs, hs)


def _recomputed_bwd(residuals, grads):
    wi, wh, b, c0, h0, xs, cs, hs = residuals
    (d_c_last, d_h_last), d_hs = grads
    time_steps, batch, _ = xs.shape
    previous_hs = jnp.concatenate([h0[None], hs[:-1]]).reshape(time_steps * batch, -1)
    z = xs.reshape(time_steps * batch, -1) @ wi + previous_hs @ wh + b
    gates = _gates(z.reshape(time_steps, batch, -1))
    return _backward(wi, wh, xs, c0, h0, cs, hs, gates, d_c_last, d_h_last, d_hs)


fused_recomputed_gates.defvjp(_recomputed_fwd, _recomputed_bwd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    options = parser.parse_args()
    hidden, repeats = options.hidden, options.repeats
    keys = jax.random.split(jax.random.key(0), 6)
    args = (
        0.1 * jax.random.normal(keys[0], (INPUT, 4 * hidden)),
        0.05 * jax.random.normal(keys[1], (hidden, 4 * hidden)),
        0.1 * jnp.ones(4 * hidden),
        0.2 * jax.random.normal(keys[2], (BATCH, hidden)),
        0.2 * jax.random.normal(keys[3], (BATCH, hidden)),
        jax.random.normal(keys[4], (TIME, BATCH, INPUT)),
    )
    weights = jax.random.normal(keys[5], (TIME, BATCH, hidden))

    def gradient_of(layer):
        def loss(*args):
            (c, h), hs = layer(*args)
            return jnp.sum(hs * weights) + jnp.sum(c) + jnp.sum(h)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))

    layers = {
        "autodiff": autodiff,
        "fused_saved_gates": fused_saved_gates,
        "fused_recomputed_gates": fused_recomputed_gates,
    }
    grads = {name: gradient_of(layer) for name, layer in layers.items()}
    reference = grads["autodiff"](*args)
    seconds = {name: [] for name in layers}
    for name, grad in grads.items():
        difference = max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(grad(*args), reference, strict=True)
        )
        scale = max(float(jnp.max(jnp.abs(a))) for a in reference)
        print(f"{name}: max gradient difference {difference:.2e} (largest gradient {scale:.1f})")
    for _ in range(3):  # Alternate the variants, so drifting machine load hits them alike.
        for name, grad in grads.items():
            jax.block_until_ready(grad(*args))
            start = time.perf_counter()
            for _ in range(repeats):
                result = grad(*args)
            jax.block_until_ready(result)
            seconds[name].append((time.perf_counter() - start) / repeats)
    base = statistics.median(seconds["autodiff"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:24s} {median * 1e3:7.1f} ms  {base / median:.2f}x autodiff")


if __name__ == "__main__":
    main()
