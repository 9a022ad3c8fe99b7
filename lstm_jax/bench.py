"""Speed benchmark: training chars/s, FLOP utilisation, generation chars/s, and a PyTorch peer.

Training is timed with the pieces `lstm_jax.train` uses: `steps.init_state`, the pmapped
`parallel.train_step`, the state replicated and random character ids sharded over the devices.
The first call is timed apart as compile time, then untimed steps warm up; each timed window
ends when the device work is done, and medians over windows are reported. Model FLOPs per
character are counted from the cells' matmuls (`Cell.flops_per_step`).

    python -m lstm_jax.bench                       # the headline 2x512 LSTM on all devices
    python -m lstm_jax.bench --compare=pytorch     # plus the same model in PyTorch, interleaved
    python -m lstm_jax.bench --cell=gru --hidden=128 --num_layers=1 --json=/tmp/bench.json
    python -m lstm_jax.bench --population=8        # 8 members in one vmapped step (--seeds=8)

Model, batch and step come from the training flags (`lstm_jax.main`'s), by default with the step
the PyTorch peer runs (Adam, no dropout). `--flagfile=runs/NAME/flags.txt` (every setting of a
run) times that run's model and step; the flags that do not change the step (--workdir...) are
ignored. Prints a table and writes every number to --json (in a folder that exists)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lstm_jax import bench_population, cli, memory, parallel, steps
from lstm_jax.config import Config, OptimConfig, RegularizationConfig, leaf_settings, setting
from lstm_jax.errors import UsageError
from lstm_jax.generate import generate
from lstm_jax.models import CharLSTM, count_params, forward_flops_per_char
from lstm_jax.peer import PEER_SETTINGS, PEERS, load_peer, start_peer  # noqa: F401 (experiments)
from lstm_jax.settings import MEMBERS, NON_NEGATIVE, POSITIVE, check_ranges

NUM_HOST_BATCHES = 4  # Distinct random batches, cycled (the peer uses as many).
MATMUL_RUNS = 5
GENERATE_BATCHES = (1, 64)
# Recorded under "settings" in the JSON: how the run timed, and the step it timed.
TIMING_SETTINGS = ("untimed_steps", "windows", "steps_per_window", "generate_length")
STEP_SETTINGS = "optimizer learning_rate weight_decay grad_clip dropout carry_state".split()


def _defaults(section: type, **changes: Any) -> Any:
    return dataclasses.field(default_factory=functools.partial(section, **changes))


@dataclasses.dataclass(frozen=True)
class BenchConfig(Config):
    """A `Config` with the benchmark's defaults: the step the PyTorch peer runs (Adam, no
    dropout). Any other training setting is timed by setting its flag."""

    regularization: RegularizationConfig = _defaults(RegularizationConfig, dropout=0.0)
    optim: OptimConfig = _defaults(OptimConfig, optimizer="adam", weight_decay=0.0)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """bench: what is timed, how often, and where the numbers go"""

    vocab_size: int = setting(
        96, "Characters in the vocabulary (random ids); Dracula has 96.", within=POSITIVE
    )
    untimed_steps: int = setting(
        3, "Untimed training steps after the compiling first call.", within=NON_NEGATIVE
    )
    windows: int = setting(5, "Timed windows (and generation calls); medians.", within=POSITIVE)
    steps_per_window: int = setting(10, "Training steps per timed window.", within=POSITIVE)
    generate_length: int = setting(500, "Characters per timed sampling call.", within=POSITIVE)
    matmul_size: int = setting(
        0, "Side of the square matmul (in --dtype) timed as the peak FLOP/s; 0: 2048 on CPU, "
        "8192 on accelerators.", within=NON_NEGATIVE,
    )  # fmt: skip
    compare: str = setting(
        "", "Also time the same model in this framework, window by window in turn with JAX; it "
        "needs the peer's step (--cell=lstm, float32, Adam, no dropout). Empty: JAX only.",
        choices=("", *PEERS),
    )  # fmt: skip
    devices: int = setting(
        0, "Local devices to train on, data parallel; 0: all of them.", within=NON_NEGATIVE
    )
    population: int = setting(
        1, "Members trained together in one vmapped step, as --seeds=N trains them (laid out "
        "over the devices as a population run lays them out); 1: a single run's step.",
        within=MEMBERS,
    )  # fmt: skip
    json_path: str = setting("bench.json", "Where to write every number, as JSON.", flag="json")


def matmul_side(options: BenchOptions, platform: str) -> int:
    """The side of the timed matmul: --matmul_size, or the platform's default."""
    return options.matmul_size or (2048 if platform == "cpu" else 8192)


def validate(config: Config, options: BenchOptions, local_device_count: int) -> None:
    """Raise `UsageError` naming the first impossible setting; before any compile or import.
    Every size that allocates (the model and batch of the training step, the matmul, the
    generation length, the population) goes through `lstm_jax.memory`'s estimate first."""
    config.validate()
    check_ranges(options)
    count, batch = local_device_count, config.data.global_batch
    if options.devices > count:
        raise UsageError(f"--devices must be in [0, {count}] (0: all), got {options.devices}.")
    num_devices = options.devices or count
    if batch % num_devices:
        raise UsageError(
            f"--global_batch={batch} does not divide over {num_devices} devices; use a multiple "
            f"of {num_devices} or set --devices."
        )
    platform = jax.local_devices()[0].platform
    memory.refuse_beyond_memory([
        memory.training_need(config, options.vocab_size),
        memory.matmul_need(matmul_side(options, platform), num_devices, config.compute.dtype),
        memory.generation_need(max(GENERATE_BATCHES), options.generate_length),
    ])  # fmt: skip
    bench_population.validate(config, options, num_devices)
    ours = {f.name: value for f, value in leaf_settings(config)}
    differ = [f"--{k}={ours[k]} (peer: {v})" for k, v in PEER_SETTINGS.items() if ours[k] != v]
    differ += [] if config.model.embed_dim else ["--embed_dim=0 (peer: an embedding)"]
    if options.compare and differ:
        raise UsageError(
            f"--compare={options.compare} times the peer's fixed step, an nn.LSTM in float32 with "
            f"Adam and no dropout; this one differs: {', '.join(differ)}. Drop --compare or those."
        )


def _seconds(call: Callable[[], Any], runs: int) -> tuple[float, list[float]]:
    """Seconds of a first call (which compiles), then of `runs` more, each until done."""
    seconds = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        jax.block_until_ready(call())
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1:]


def _rates(window_seconds: list[float], chars_per_window: int, steps: int) -> dict[str, Any]:
    median = float(np.median(window_seconds))
    return {
        "chars_per_second": chars_per_window / median,
        "step_seconds": median / steps,
        "window_seconds": window_seconds,
        "window_chars_per_second": [chars_per_window / s for s in window_seconds],
    }


def measure_training(
    config: Config,
    options: BenchOptions,
    devices: Sequence[jax.Device],
    *,
    peer: ModuleType | None = None,
    log: Callable[[str], None] = logging.info,
) -> tuple[dict[str, Any], dict[str, Any] | None, CharLSTM, Any]:
    """Time the pmapped train step; with `peer`, its windows alternate with the peer's.

    Returns (training numbers, peer numbers or None, the model, its initial parameters).
    """
    num_devices, batch, seq_len = len(devices), config.data.global_batch, config.data.seq_len
    total_steps = 1 + options.untimed_steps + options.windows * options.steps_per_window
    if options.population > 1:
        return bench_population.measure(config, options, devices, total_steps, _rates, log)
    model, state = steps.init_state(config, options.vocab_size, total_steps)
    params, state = state.params, parallel.replicate(state, devices)
    carry = jax.tree.map(
        lambda c: parallel.shard(np.asarray(c), num_devices), model.initialize_carry(batch)
    )
    rng, shape = np.random.default_rng(0), (batch, seq_len + 1)
    host_batches = [
        parallel.shard(rng.integers(0, options.vocab_size, shape, np.int32), num_devices)
        for _ in range(NUM_HOST_BATCHES)
    ]
    log(f"Compiling the train step for {num_devices} device(s)...")
    start = time.perf_counter()
    # Compiled ahead of time, so that XLA's memory plan for the step can be read (on CPUs too).
    compiled = parallel.train_step(devices).lower(state, host_batches[0], carry, True).compile()
    memory_plan = compiled.memory_analysis()  # None where the backend does not report it.
    p_train_step = parallel.one_call_in_flight(compiled, devices)
    steps_done = 0

    def run_steps(count: int) -> None:
        nonlocal state, carry, steps_done
        for _ in range(count):
            reset = steps_done == 0 or not config.data.carry_state
            host_batch = host_batches[steps_done % len(host_batches)]
            state, carry, _ = p_train_step(state, host_batch, carry, reset)
            steps_done += 1
        jax.block_until_ready((state, carry))

    run_steps(1)
    compile_seconds = time.perf_counter() - start
    run_steps(options.untimed_steps)
    trainer = None if peer is None else start_peer(peer, config, options, devices[0].platform)
    window_seconds, peer_seconds = [], []
    for window in range(options.windows):
        start = time.perf_counter()
        run_steps(options.steps_per_window)
        window_seconds.append(time.perf_counter() - start)
        if trainer is not None:
            peer_seconds.append(trainer.train_window(options.steps_per_window))
        log(f"Training window {window + 1}/{options.windows} done.")

    chars, steps_per_window = batch * seq_len * options.steps_per_window, options.steps_per_window
    peak_bytes = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    training = {
        "compile_seconds": compile_seconds,
        **_rates(window_seconds, chars, steps_per_window),
        "peak_memory_bytes": None if None in peak_bytes else max(peak_bytes),
        "step_scratch_bytes": None if memory_plan is None else memory_plan.temp_size_in_bytes,
    }
    if trainer is None:
        return training, None, model, params
    import torch

    peer_numbers = {"peer": "pytorch", "torch_version": torch.__version__}
    peer_numbers |= {"device": trainer.device.type, "num_threads": torch.get_num_threads()}
    return training, peer_numbers | _rates(peer_seconds, chars, steps_per_window), model, params


def measure_matmul_peak(
    devices: Sequence[jax.Device], size: int, runs: int = MATMUL_RUNS, dtype: str = "float32"
) -> dict[str, Any]:
    """FLOP/s of a jitted [size, size] @ [size, size] matmul in `dtype` on every device at once.

    The matmuls run side by side (one per device, sharded over the devices training uses), so
    the peak is the aggregate the training step could reach, also when several (fake) CPU
    devices share one processor. Default matmul precision, as in the model.
    """
    mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
    sharding, shape = NamedSharding(mesh, PartitionSpec(parallel.AXIS)), (len(devices), size, size)
    make = jax.jit(
        lambda key: jax.random.normal(key, shape, jnp.dtype(dtype)), out_shardings=sharding
    )
    a, b = make(jax.random.key(1)), make(jax.random.key(2))
    matmul = jax.jit(jnp.matmul, out_shardings=sharding)
    _, run_seconds = _seconds(lambda: matmul(a, b), runs)
    peak = len(devices) * 2 * size**3 / float(np.median(run_seconds))
    return dict(size=size, dtype=dtype, run_seconds=run_seconds, flops_per_second=peak)


def measure_generation(
    model: CharLSTM, params: Any, device: jax.Device, *, batch: int, length: int, runs: int
) -> dict[str, Any]:
    """chars/s of `lstm_jax.generate.generate` for `batch` samples of `length` characters."""
    params = jax.device_put(params, device)
    prompt_ids = jax.device_put(jnp.zeros((batch, 1), jnp.int32), device)
    key = jax.device_put(jax.random.key(0), device)
    compile_seconds, run_seconds = _seconds(
        lambda: generate(model, params, prompt_ids, key, 1.0, length=length), runs
    )
    speed = batch * length / float(np.median(run_seconds))
    numbers = dict(batch=batch, length=length, compile_seconds=compile_seconds)
    return numbers | dict(run_seconds=run_seconds, chars_per_second=speed)


def run_benchmark(
    config: Config,
    options: BenchOptions,
    *,
    peer: ModuleType | None = None,
    log: Callable[[str], None] = logging.info,
) -> dict[str, Any]:
    """Every measurement of one run, as a JSON-ready dict."""
    local = jax.local_devices()
    validate(config, options, len(local))
    devices = local[: options.devices or len(local)]
    platform, dtype = devices[0].platform, config.compute.dtype
    matmul_size = matmul_side(options, platform)
    measured = measure_training(config, options, devices, peer=peer, log=log)
    train, peer_numbers, model, params = measured
    log(f"Timing a {matmul_size}x{matmul_size} {dtype} matmul for the peak FLOP/s...")
    matmul = measure_matmul_peak(devices, matmul_size, dtype=dtype)
    # Training: the forward, and twice its matmuls backward (gradients of inputs and weights).
    train["flops_per_char"] = 3 * forward_flops_per_char(config.model, options.vocab_size)
    train["flops_per_second"] = train["flops_per_char"] * train["chars_per_second"]
    train["utilisation"] = train["flops_per_second"] / matmul["flops_per_second"]
    generation, length, runs = {}, options.generate_length, options.windows
    for batch in GENERATE_BATCHES:
        log(f"Timing generation at batch {batch}...")
        generation[f"batch_{batch}"] = measure_generation(
            model, params, devices[0], batch=batch, length=length, runs=runs
        )
    compare = None
    if peer_numbers is not None:
        ratio = train["chars_per_second"] / peer_numbers["chars_per_second"]
        compare = peer_numbers | {"jax_chars_per_second": train["chars_per_second"]}
        compare["jax_over_peer"] = ratio
    flat = {f.name: value for f, value in leaf_settings(config)}
    sizes = dataclasses.asdict(config.model) | dataclasses.asdict(config.compute)
    sizes |= {"vocab_size": options.vocab_size} | {n: flat[n] for n in ("global_batch", "seq_len")}
    settings = {name: getattr(options, name) for name in TIMING_SETTINGS}
    return {
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "platform": platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "cpu_count": os.cpu_count(),
        "sizes": sizes | {"parameters": count_params(params)},
        "settings": settings | {name: flat[name] for name in STEP_SETTINGS},
        "train": train,
        "matmul": matmul,
        "generate": generation,
        "compare": compare,
    }


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def format_table(results: dict[str, Any]) -> str:
    """The run's headline numbers as an aligned two-column table."""
    sizes, train, matmul = results["sizes"], results["train"], results["matmul"]
    settings, compare = results["settings"], results["compare"]
    peak_memory, scratch = train["peak_memory_bytes"], train["step_scratch_bytes"]
    peak = matmul["flops_per_second"]
    extras = [name for name in ("residual", "layer_norm", "tie_embeddings") if sizes[name]]
    extras += [f"--block={sizes['block']}"] if sizes["block"] != "plain" else []
    extras += [f"--{name}={sizes[name]}" for name in ("remat", "scan", "unroll", "hoist_input")]
    model = f"{sizes['num_layers']}x{sizes['hidden']} {sizes['cell']}, embed {sizes['embed_dim']}"
    model += f", vocab {sizes['vocab_size']}, {sizes['parameters']:,} parameters"
    rows = [
        ("device", f"{results['device_kind']} x{results['num_devices']} ({results['platform']})"),
        ("jax", results["jax_version"]),
        ("model", ", ".join([model, sizes["dtype"], *extras])),
        ("batch", f"{sizes['global_batch']} x {sizes['seq_len']} characters"),
        ("train step", f"{settings['optimizer']}, dropout {settings['dropout']}"),
        ("train compile (first call)", f"{train['compile_seconds']:.2f} s"),
        ("train chars/s (median)", f"{train['chars_per_second']:,.0f}"),
        *bench_population.table_rows(train),
        ("train step time (median)", f"{train['step_seconds'] * 1e3:.2f} ms"),
        ("peak device memory", "n/a" if peak_memory is None else _si(peak_memory, "B")),
        ("train step scratch memory (XLA)", "n/a" if scratch is None else _si(scratch, "B")),
        ("model FLOPs per char", f"{train['flops_per_char']:,}"),
        ("achieved", _si(train["flops_per_second"], "FLOP/s")),
        (f"matmul peak ({matmul['size']}^2 {matmul['dtype']})", _si(peak, "FLOP/s")),
        ("utilisation", f"{train['utilisation']:.1%}"),
    ]
    for name, numbers in results["generate"].items():
        speed, compile_seconds = numbers["chars_per_second"], numbers["compile_seconds"]
        label = f"generate {name.replace('_', ' ')}"
        rows.append((label, f"{speed:,.0f} chars/s (compile {compile_seconds:.2f} s)"))
    if compare is not None:
        peer, speed = compare["peer"], compare["chars_per_second"]
        torch = f"torch {compare['torch_version']}, {compare['device']}"
        torch += f", {compare['num_threads']} threads"
        rows.append((f"{peer} chars/s (median)", f"{speed:,.0f} ({torch})"))
        rows.append((f"jax / {peer}", f"{compare['jax_over_peer']:.2f}x"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.INFO)
    with cli.user_errors():
        cli.refuse_positional_arguments(argv)
        config, options = cli.read_flags(BenchConfig), cli.read_flags(BenchOptions)
        validate(config, options, jax.local_device_count())  # Before loading torch, compiling.
        json_path = cli.writable_file_flag("json", options.json_path)  # Not after the run.
        peer = load_peer(options.compare) if options.compare else None
        results = run_benchmark(config, options, peer=peer)
        # The JSON first: a reader that stops early (`| head -3`) does not cost the numbers.
        cli.write_atomically(json_path, json.dumps(results, indent=2) + "\n")
        print(format_table(results))
    logging.info("Wrote %s.", json_path)


if __name__ == "__main__":
    cli.run(main, [BenchConfig, BenchOptions])
