"""Experiment: does streaming (what `python -m lstm_jax.sample` prints as it goes) slow generation?

Times one long generation two ways on the same model, same length, same seed, in one process,
alternating run by run, each first in turn: `lstm_jax.generate.generate` (one jitted call, the
tokens at the end) and `lstm_jax.generate.stream_tokens` (the same draws in chunks of
`stream_chunk(batch)` characters per row, or --chunk, one jitted call each, every chunk brought
to the host as it is done, the next one already queued). Also reports when the first chunk
reaches the host. Both are compiled first.

    python experiments/perf/stream_speed.py                       # 2 x 512, batch 1, 4,000 chars
    python experiments/perf/stream_speed.py --batch=64 --length=2000

Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.config import ModelConfig
from lstm_jax.generate import generate, stream_chunk, stream_tokens
from lstm_jax.models import CharLSTM, init_params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=0, help="0: stream_chunk(batch)")
    args = parser.parse_args()
    model = CharLSTM(ModelConfig(hidden=args.hidden, num_layers=args.num_layers), 96)
    params = init_params(model, jax.random.key(1))
    prompt = jnp.zeros((args.batch, 8), jnp.int32)
    key = jax.random.key(0)
    size = args.chunk or stream_chunk(args.batch)

    def whole() -> np.ndarray:
        return np.asarray(generate(model, params, prompt, key, 0.8, length=args.length))

    def streamed() -> tuple[np.ndarray, float]:
        start, first, chunks = time.perf_counter(), None, []
        for chunk in stream_tokens(model, params, prompt, key, 0.8, length=args.length, chunk=size):
            first = first or time.perf_counter() - start
            chunks.append(chunk)
        return np.concatenate(chunks, axis=1), first

    assert np.array_equal(whole(), streamed()[0])  # Compiles both; the same characters.
    seconds = {"whole": [], "streamed": []}
    firsts = []
    for repeat in range(args.repeats):
        for name in ("whole", "streamed") if repeat % 2 else ("streamed", "whole"):
            start = time.perf_counter()
            if name == "whole":
                whole()
            else:
                firsts.append(streamed()[1])
            seconds[name].append(time.perf_counter() - start)
    chars = args.batch * args.length
    speed = {name: chars / statistics.median(s) for name, s in seconds.items()}
    best = {name: chars / min(s) for name, s in seconds.items()}
    device = jax.devices()[0]
    print(
        f"{args.num_layers} x {args.hidden}, batch {args.batch}, {args.length} characters, "
        f"{device.device_kind} ({device.platform}), {args.repeats} runs each, "
        f"chunks of <= {size}: chars/s median (best)"
    )
    print(f"  generate (one call):   {speed['whole']:,.0f} ({best['whole']:,.0f})")
    print(f"  stream_tokens:         {speed['streamed']:,.0f} ({best['streamed']:,.0f})")
    ratio, best_ratio = speed["streamed"] / speed["whole"], best["streamed"] / best["whole"]
    print(f"  streamed / whole:      {ratio:.3f} ({best_ratio:.3f})")
    print(f"  first chunk after:     {statistics.median(firsts) * 1e3:.1f} ms (median)")


if __name__ == "__main__":
    main()
