"""Experiment: how fast can XLA generate one character at a time with a 2 x 512 LSTM at batch 1?

A hand-written generator with no Flax in it: both layers' kernels concatenated once ([in + h,
4h]), one matrix-vector product per layer per character, categorical sampling, all in one
jitted `lax.scan`. If this is no faster than `lstm_jax.generate.generate` (see `python -m
lstm_jax.bench`), the model code is not what limits batch-1 generation: the backend's
matrix-vector products are.

    python experiments/perf/generate_floor.py

Results are in docs/performance.md.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

HIDDEN, EMBED, VOCAB, LENGTH = 512, 64, 96, 500


def _cell(kernel, bias, c, h, x):
    z = jnp.concatenate([x, h], axis=-1) @ kernel + bias
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * jnp.tanh(c)


def main() -> None:
    keys = jax.random.split(jax.random.key(0), 5)
    embedding = jax.random.normal(keys[0], (VOCAB, EMBED))
    kernel0 = 0.05 * jax.random.normal(keys[1], (EMBED + HIDDEN, 4 * HIDDEN))
    kernel1 = 0.05 * jax.random.normal(keys[2], (2 * HIDDEN, 4 * HIDDEN))
    bias = jnp.zeros(4 * HIDDEN)
    output = 0.05 * jax.random.normal(keys[3], (HIDDEN, VOCAB))

    @jax.jit
    def generate(key):
        def step(state, step_key):
            c0, h0, c1, h1, token = state
            c0, h0 = _cell(kernel0, bias, c0, h0, embedding[token])
            c1, h1 = _cell(kernel1, bias, c1, h1, h0)
            token = jax.random.categorical(step_key, h1 @ output)
            return (c0, h0, c1, h1, token), token

        zeros = jnp.zeros((1, HIDDEN))
        start = (zeros, zeros, zeros, zeros, jnp.zeros((1,), jnp.int32))
        return jax.lax.scan(step, start, jax.random.split(key, LENGTH))[1]

    jax.block_until_ready(generate(keys[4]))
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(generate(keys[4]))
        seconds.append(time.perf_counter() - start)
    print(
        f"hand-written 2 x {HIDDEN} generator, batch 1: "
        f"{LENGTH / statistics.median(seconds):,.0f} chars/s on {jax.devices()[0].platform}"
    )


if __name__ == "__main__":
    main()
