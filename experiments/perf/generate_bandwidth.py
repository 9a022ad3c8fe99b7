"""Experiment: the memory-bandwidth ceiling on batch-1 generation for the 2 x 512 LSTM.

At batch 1 every character needs every weight of the model once (the kernels of both LSTM layers
and of the output layer, about 12.8 MB in float32), and they do not fit in this machine's 2 MB
per-core L2 cache, so each character streams them from L3 or memory. This script times only
that: a jitted `lax.scan` of the three matrix-vector products per character (no gates, no
sampling), and reports the bytes it streams per second and the characters per second that
bandwidth allows. Any exact float32 generator built from XLA ops is slower than this. It then
times `lstm_jax.generate.generate` on a model of the same shape, in the same run, so the share of
the ceiling it reaches does not depend on how fast the machine is that minute.

    python experiments/perf/generate_bandwidth.py

Results are in docs/performance.md.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from lstm_jax.bench import measure_generation
from lstm_jax.config import ModelConfig
from lstm_jax.models import CharLSTM, init_params

HIDDEN, EMBED, VOCAB, LENGTH, REPEATS = 512, 64, 96, 1000, 7


def main() -> None:
    keys = jax.random.split(jax.random.key(0), 3)
    kernels = (
        0.05 * jax.random.normal(keys[0], (EMBED + HIDDEN, 4 * HIDDEN)),
        0.05 * jax.random.normal(keys[1], (2 * HIDDEN, 4 * HIDDEN)),
        0.05 * jax.random.normal(keys[2], (HIDDEN, VOCAB)),
    )
    bytes_per_char = sum(kernel.nbytes for kernel in kernels)

    @jax.jit
    def products_only(kernels):
        first, second, output = kernels

        def step(h, _):
            h0 = (jnp.concatenate([h[:, :EMBED], h], axis=-1) @ first)[:, :HIDDEN]
            h1 = (jnp.concatenate([h0, h], axis=-1) @ second)[:, :HIDDEN]
            logits = h1 @ output
            return h1 + logits[:, :1], None

        return jax.lax.scan(step, jnp.ones((1, HIDDEN)), length=LENGTH)[0]

    jax.block_until_ready(products_only(kernels))
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(products_only(kernels))
        seconds.append(time.perf_counter() - start)
    per_char = statistics.median(seconds) / LENGTH
    print(
        f"weights read per character: {bytes_per_char / 1e6:.1f} MB (float32); "
        f"XLA streams them at {bytes_per_char / per_char / 1e9:.0f} GB/s; "
        f"ceiling {1 / per_char:,.0f} chars/s at batch 1 on {jax.devices()[0].platform}"
    )
    model = CharLSTM(ModelConfig(embed_dim=EMBED, hidden=HIDDEN, num_layers=2), VOCAB)
    params = init_params(model, jax.random.key(1))
    ours = measure_generation(
        model, params, jax.devices()[0], batch=1, length=LENGTH, runs=REPEATS
    )["chars_per_second"]
    print(
        f"lstm_jax.generate.generate at batch 1: {ours:,.0f} chars/s = {ours * per_char:.0%} of it"
    )


if __name__ == "__main__":
    main()
