"""`python -m lstm_jax.bench --population=N`: N members trained in one vmapped step, laid out
over the devices as a population run lays them out (`parallel.PopulationLayout`), timed as
`bench` times a single run; chars/s counts every member's characters, and per member.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lstm_jax import parallel, population
from lstm_jax.config import Config
from lstm_jax.errors import UsageError

NUM_HOST_BATCHES = 4  # Distinct random batches, cycled, as bench's single-run timing does.


def validate(config: Config, options: Any, num_devices: int) -> None:
    """A `UsageError` for a population bench cannot time or the machine cannot hold."""
    if config.population.seeds != 1 or config.population.grid.strip():
        raise UsageError(
            "bench times N members with --population=N (seeds --seed, --seed+1, ...); drop "
            "--seeds and --grid, which are the training command's."
        )
    if options.population == 1:
        return
    if options.compare:
        raise UsageError("--compare times one run; drop --population or --compare.")
    layout = parallel.PopulationLayout(
        options.population, tuple(range(num_devices)), config.population.member_loop
    )
    population.refuse_beyond_memory(config, options.vocab_size, _members(config, options), layout)


def _members(config: Config, options: Any) -> list[population.Member]:
    return population.members(config.replace(seeds=options.population, grid=""))


def _population_step(config: Config, options: Any, devices, total_steps: int, rng):
    """(model, params of member 0, step(count) that trains, chars a step) for --population."""
    members = _members(config, options)
    layout = parallel.PopulationLayout(len(members), tuple(devices), config.population.member_loop)
    model, state, hparams = population.init_states(members, options.vocab_size, total_steps)
    params = jax.tree.map(lambda x: x[0], state.params)
    state, hparams = layout.state_to_devices(state), layout.state_to_devices(hparams)
    batch, seq_len, count = config.data.global_batch, config.data.seq_len, len(members)
    zero = model.initialize_carry(batch)
    carry = jax.tree.map(lambda c: layout.to_devices(np.stack([np.asarray(c)] * count)), zero)
    shape = (count, batch, seq_len + 1)
    host_batches = [
        layout.to_devices(rng.integers(0, options.vocab_size, shape, np.int32))
        for _ in range(NUM_HOST_BATCHES)
    ]
    train_step = layout.train_step()
    done = 0

    def run_steps(n: int) -> None:
        nonlocal state, carry, done
        for _ in range(n):
            reset = done == 0 or not config.data.carry_state
            host_batch = host_batches[done % len(host_batches)]
            state, carry, _ = train_step(state, host_batch, carry, reset, hparams)
            done += 1
        jax.block_until_ready((state, carry))

    return model, params, run_steps, layout


def measure(config: Config, options: Any, devices, total_steps: int, rates: Callable, log):
    """`bench.measure_training`'s numbers for `options.population` members in one step:
    chars/s of them all and per member; (numbers, None for the peer, model, member 0's params).
    `rates`: bench's summary of the timed windows."""
    model, params, run_steps, layout = _population_step(
        config, options, devices, total_steps, np.random.default_rng(0)
    )
    log(f"Compiling the train step of {layout.describe()}...")
    start = time.perf_counter()
    run_steps(1)
    compile_seconds = time.perf_counter() - start
    run_steps(options.untimed_steps)
    window_seconds = []
    for window in range(options.windows):
        start = time.perf_counter()
        run_steps(options.steps_per_window)
        window_seconds.append(time.perf_counter() - start)
        log(f"Training window {window + 1}/{options.windows} done.")
    members, per_member = options.population, config.data.global_batch * config.data.seq_len
    chars = members * per_member * options.steps_per_window
    peak_bytes = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    training = {
        "compile_seconds": compile_seconds,
        **rates(window_seconds, chars, options.steps_per_window),
        "peak_memory_bytes": None if None in peak_bytes else max(peak_bytes),
        "step_scratch_bytes": None,
        "population": members,
        "population_layout": layout.describe(),
    }
    training["chars_per_second_per_member"] = training["chars_per_second"] / members
    return training, None, model, params


def table_rows(train: dict[str, Any]) -> list[tuple[str, str]]:
    if train.get("population", 1) == 1:
        return []
    return [
        ("population", f"{train['population']} members: {train['population_layout']}"),
        ("train chars/s per member", f"{train['chars_per_second_per_member']:,.0f}"),
    ]
