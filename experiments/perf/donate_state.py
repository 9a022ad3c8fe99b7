"""Experiment (not kept): donate the train state and the carry to the pmapped train step.

`jax.pmap(..., donate_argnums=(0, 2))` lets XLA write the new parameters, optimizer state and
carry into the buffers of the old ones instead of allocating new ones each step. This times the
real `lstm_jax.steps.train_step`, pmapped as `lstm_jax.parallel.train_step` does it, with and
without donation, alternating the two so that drifting machine speed hits both alike.

    python experiments/perf/donate_state.py --hidden=256 --num_layers=1
    python experiments/perf/donate_state.py --hidden=512 --num_layers=2

Results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from lstm_jax import parallel, steps
from lstm_jax.config import Config
from lstm_jax.models import build_model, init_params

BATCH, SEQ_LEN, VOCAB = 64, 100, 96


def pmapped_step(devices, donate: bool):
    return jax.pmap(
        functools.partial(steps.train_step, axis_name=parallel.AXIS),
        axis_name=parallel.AXIS,
        in_axes=(None, 0, 0, None),
        out_axes=(None, 0, None),
        devices=devices,
        donate_argnums=(0, 2) if donate else (),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="Steps per timed window.")
    parser.add_argument("--windows", type=int, default=4, help="Timed windows per variant.")
    options = parser.parse_args()
    config = Config.create(
        hidden=options.hidden,
        num_layers=options.num_layers,
        seq_len=SEQ_LEN,
        global_batch=BATCH,
        dropout=0.0,
        optimizer="adam",
        weight_decay=0.0,
    )
    devices = jax.local_devices()
    model = build_model(config, VOCAB)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = parallel.shard(rng.integers(0, VOCAB, (BATCH, SEQ_LEN + 1), np.int32), len(devices))
    runs = {}
    for donate in (False, True):
        state = parallel.replicate(
            steps.create_train_state(model, params, config.optim, 1000, jax.random.key(1)),
            devices,
        )
        carry = jax.tree.map(
            lambda c: parallel.shard(np.asarray(c), len(devices)), model.initialize_carry(BATCH)
        )
        runs[donate] = [pmapped_step(devices, donate), state, carry]
    seconds = {False: [], True: []}
    for window in range(options.windows + 1):  # The first window compiles and warms up.
        for donate, run in runs.items():
            step, state, carry = run
            start = time.perf_counter()
            for _ in range(options.steps):
                state, carry, _ = step(state, batch, carry, False)
            jax.block_until_ready((state, carry))
            if window:
                seconds[donate].append((time.perf_counter() - start) / options.steps)
            run[1:] = [state, carry]
    kept = statistics.median(seconds[False])
    for donate, values in seconds.items():
        step_seconds = statistics.median(values)
        print(
            f"{options.num_layers} x {options.hidden}, donate={donate}: "
            f"{1e3 * step_seconds:.1f} ms/step, {BATCH * SEQ_LEN / step_seconds:,.0f} chars/s "
            f"({kept / step_seconds:.2f}x without donation)"
        )


if __name__ == "__main__":
    main()
