"""Experiment: `--scan=layered` against `--scan=wavefront`, each with `--unroll` 1 and 4.

With `--hoist`: the layered scan against `--hoist_input` (unroll 1 and 4) instead.

Builds the train step (`lstm_jax.steps.train_step`, jitted, one device) of the benchmark's
model and step (`lstm_jax.bench.BenchConfig`: Adam, no dropout) for every variant, then times
them in turns, one window of steps each per round, so that a busy machine slows all of them
alike; medians over rounds. The layered unroll-1 step is the baseline, measured in the same
rounds. The first step's losses must agree.

    python experiments/perf/scan.py --batch=64
    python experiments/perf/scan.py --batch=256 --rounds=3
    python experiments/perf/scan.py --hoist --hidden=128

Results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import numpy as np

from lstm_jax.bench import BenchConfig
from lstm_jax.models import build_model, init_params
from lstm_jax.steps import create_train_state, train_step

VOCAB = 96
SCANS = ("layered", "wavefront")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="Timed windows per variant.")
    parser.add_argument("--steps", type=int, default=3, help="Steps per window.")
    parser.add_argument("--hoist", action="store_true", help="Time --hoist_input instead.")
    options = parser.parse_args()
    shape = (options.batch, options.seq_len + 1)
    batch = np.random.default_rng(0).integers(0, VOCAB, shape, np.int32)
    runs = {}
    variants = [(scan, unroll, False) for scan, unroll in itertools.product(SCANS, (1, 4))]
    if options.hoist:
        variants = [("layered", 1, False), ("layered", 1, True), ("layered", 4, True)]
    for scan, unroll, hoist in variants:
        config = BenchConfig().replace(
            hidden=options.hidden, num_layers=options.num_layers, seq_len=options.seq_len,
            global_batch=options.batch, scan=scan, unroll=unroll,
            hoist_input=hoist,
        )  # fmt: skip
        model = build_model(config, VOCAB)
        params = init_params(model, jax.random.key(0))
        state = create_train_state(model, params, config.optim, 1000, jax.random.key(1))
        carry = model.initialize_carry(options.batch)
        start = time.perf_counter()
        step = jax.jit(lambda state, batch, carry: train_step(state, batch, carry, False))
        compiled = step.lower(state, batch, carry).compile()
        _, _, metrics = jax.block_until_ready(compiled(state, batch, carry))
        name = f"{scan}, unroll {unroll}" + (", hoist_input" if hoist else "")
        loss = float(metrics["loss_sum"] / metrics["count"])
        runs[name] = dict(step=compiled, state=state, carry=carry, loss=loss, seconds=[])
        print(f"{name}: compiled and ran once in {time.perf_counter() - start:.1f} s, loss {loss}")
    for _ in range(options.rounds):
        for run in runs.values():
            state, carry = run["state"], run["carry"]
            start = time.perf_counter()
            for _ in range(options.steps):
                state, carry, _ = run["step"](state, batch, carry)
            jax.block_until_ready((state, carry))
            run["seconds"].append((time.perf_counter() - start) / options.steps)
    chars = options.batch * options.seq_len
    base = statistics.median(runs["layered, unroll 1"]["seconds"])
    print("| variant | step (median) | chars/s | vs layered, unroll 1 | first loss |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        seconds = statistics.median(run["seconds"])
        print(
            f"| {name} | {seconds * 1e3:.1f} ms | {chars / seconds:,.0f} | "
            f"{base / seconds:.2f}x | {run['loss']:.6f} |"
        )
    print("windows, s/step:", {k: [round(s, 3) for s in r["seconds"]] for k, r in runs.items()})


if __name__ == "__main__":
    main()
