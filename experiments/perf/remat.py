"""Experiment: what `--remat` costs in time and saves in memory, on the real train step.

Builds the train step for the same model with and without `--remat` (each time step
recomputed in the backward pass instead of its intermediate values being stored), reads
XLA's scratch memory for the compiled step (`memory_analysis().temp_size_in_bytes`, which
every backend reports) and times the two steps alternately. The losses must agree.

    python experiments/perf/remat.py --hidden=512 --num_layers=2 --seq_len=100
    python experiments/perf/remat.py --hidden=512 --num_layers=2 --seq_len=500

Results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from lstm_jax.config import Config
from lstm_jax.models import build_model, init_params
from lstm_jax.steps import create_train_state, train_step

BATCH, VOCAB = 64, 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per variant.")
    options = parser.parse_args()
    batch = np.random.default_rng(0).integers(0, VOCAB, (BATCH, options.seq_len + 1), np.int32)
    steps, results = {}, {}
    for remat in (False, True):
        config = Config.create(
            hidden=options.hidden,
            num_layers=options.num_layers,
            seq_len=options.seq_len,
            global_batch=BATCH,
            dropout=0.0,
            remat=remat,
        )
        model = build_model(config, VOCAB)
        state = create_train_state(
            model, init_params(model, jax.random.key(0)), config.optim, 100, jax.random.key(1)
        )
        carry = model.initialize_carry(BATCH)
        compiled = (
            jax.jit(lambda state, batch, carry: train_step(state, batch, carry, False))
            .lower(state, batch, carry)
            .compile()
        )
        _, _, metrics = compiled(state, batch, carry)
        results[remat] = {
            "scratch_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "loss": float(metrics["loss_sum"] / metrics["count"]),
            "seconds": [],
        }
        steps[remat] = (compiled, state, carry)
    for _ in range(options.repeats):  # Alternate, so drifting machine speed hits both alike.
        for remat, (compiled, state, carry) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, batch, carry))
            results[remat]["seconds"].append(time.perf_counter() - start)
    stored = results[False]
    for remat, result in results.items():
        seconds = statistics.median(result["seconds"])
        print(
            f"{options.num_layers} x {options.hidden}, seq_len {options.seq_len}, "
            f"remat={remat}: scratch {result['scratch_bytes'] / 1e6:,.0f} MB, "
            f"step {1e3 * seconds:,.0f} ms "
            f"({statistics.median(stored['seconds']) / seconds:.2f}x without remat), "
            f"loss {result['loss']:.6f}"
        )


if __name__ == "__main__":
    main()
