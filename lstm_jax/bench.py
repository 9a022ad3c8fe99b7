"""Speed benchmark: training chars/s, FLOP utilisation, generation chars/s, and a PyTorch peer.

Training is measured with the real pieces, as `lstm_jax.train` uses them: `CharLSTM`, the
pmapped `parallel.train_step` over the chosen devices, the state replicated with
`parallel.replicate`, and batches (random character ids made on the host) sharded with
`parallel.shard`. The first call is timed apart as compile time; warm-up steps are not timed;
each timed window ends when the device work is done, and the medians over windows are reported.

    python -m lstm_jax.bench                       # the headline 2x512 model on all devices
    python -m lstm_jax.bench --compare=pytorch     # plus the same model in PyTorch, interleaved
    python -m lstm_jax.bench --hidden=128 --num_layers=1 --json=/tmp/bench.json

Prints a table on stdout and writes every number to --json.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging as pylogging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lstm_jax import parallel
from lstm_jax.config import DTYPES, Config
from lstm_jax.errors import UsageError, UserError
from lstm_jax.models import CharLSTM, build_model, count_params, init_params
from lstm_jax.sample import generate
from lstm_jax.train import create_train_state

PEER_PATH = Path(__file__).resolve().parents[1] / "experiments" / "peers" / "pytorch_lstm.py"
PEERS = ("pytorch",)
NUM_HOST_BATCHES = 4  # Distinct random batches, cycled (the peer uses as many).
MATMUL_RUNS = 5
GENERATE_BATCHES = (1, 64)
LEARNING_RATE = 2e-3  # The training default, and the peer's.
GRAD_CLIP = 5.0

# --- Flags (this command's own; lstm_jax.cli's would clash) ---
_HIDDEN = flags.DEFINE_integer("hidden", 512, "LSTM units per layer. Default 512.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Stacked LSTM layers. Default 2.")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 64, "Character embedding size. Default 64.")
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", 96, "Characters in the vocabulary. Default 96 (Dracula's)."
)
_BATCH = flags.DEFINE_integer(
    "batch", 64, "Sequences per training step, over all devices. Default 64."
)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 100, "Characters per training sequence. Default 100.")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "float32",
    list(DTYPES),
    "Compute dtype of the matmuls (parameters stay float32); the peak is measured in it too.",
)
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", 3, "Untimed training steps after the compiling first call. Default 3."
)
_WINDOWS = flags.DEFINE_integer(
    "windows", 5, "Timed windows; medians over them are reported. Default 5."
)
_STEPS_PER_WINDOW = flags.DEFINE_integer(
    "steps_per_window", 10, "Training steps per timed window. Default 10."
)
_GENERATE_LENGTH = flags.DEFINE_integer(
    "generate_length", 500, "Characters generated per timed sampling call. Default 500."
)
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size",
    0,
    "Side of the square matmul (in --dtype) timed as the peak FLOP/s. Default 0: 2048 on CPU, "
    "8192 on accelerators.",
)
_COMPARE = flags.DEFINE_enum(
    "compare",
    "",
    ["", *PEERS],
    "Also time the same model in this framework, window by window in turn with JAX. "
    "Default empty: JAX only.",
)
_REMAT = flags.DEFINE_bool(
    "remat",
    False,
    "Recompute each time step in the backward pass (lstm_jax.main --remat); compare the step "
    "scratch memory and speed with and without.",
)
_JSON = flags.DEFINE_string("json", "bench.json", "Where to write every number, as JSON.")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Local devices to train on, data parallel. Default: all of them."
)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What one benchmark run measures; `bench_options_from_flags` builds it on the command line."""

    hidden: int = 512
    num_layers: int = 2
    embed_dim: int = 64
    vocab_size: int = 96
    batch: int = 64
    seq_len: int = 100
    dtype: str = "float32"
    warmup_steps: int = 3
    windows: int = 5
    steps_per_window: int = 10
    generate_length: int = 500
    matmul_size: int = 0  # 0: 2048 on CPU, 8192 elsewhere.
    compare: str = ""
    devices: int | None = None  # None: all local devices.
    remat: bool = False

    def validate(self, local_device_count: int) -> None:
        """Raise `UsageError` naming the first impossible setting."""
        positive = {
            "hidden": self.hidden,
            "num_layers": self.num_layers,
            "embed_dim": self.embed_dim,
            "vocab_size": self.vocab_size,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "windows": self.windows,
            "steps_per_window": self.steps_per_window,
            "generate_length": self.generate_length,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UsageError(f"--{name} must be positive, got {value}.")
        if self.warmup_steps < 0:
            raise UsageError(f"--warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.matmul_size < 0:
            raise UsageError(f"--matmul_size must be >= 0 (0: automatic), got {self.matmul_size}.")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.dtype != "float32" and self.compare:
            raise UsageError(
                f"--compare times the peer in float32 only; drop --compare or use "
                f"--dtype=float32 (got --dtype={self.dtype})."
            )
        if self.compare not in ("", *PEERS):
            raise UsageError(f"--compare must be empty or one of {', '.join(PEERS)}.")
        if self.devices is not None and not 1 <= self.devices <= local_device_count:
            raise UsageError(
                f"--devices must be in [1, {local_device_count}] (local devices), "
                f"got {self.devices}."
            )
        num_devices = self.devices or local_device_count
        if self.batch % num_devices:
            raise UsageError(
                f"--batch={self.batch} does not divide over {num_devices} devices; use a "
                f"multiple of {num_devices} or set --devices."
            )


def flops_per_char(vocab_size: int, embed_dim: int, hidden: int, num_layers: int) -> int:
    """Model FLOPs to train on one character (forward and backward), counted analytically.

    Forward, per character: each LSTM layer computes its 4 gates from the layer input and the
    previous hidden state, 4 * (input_size + hidden) * hidden multiply-adds = 2 FLOPs each, with
    input_size = embed_dim for the first layer and hidden after it; the output Dense adds
    hidden * vocab_size * 2. Training counts 3x the forward (the backward pass is 2 matmuls per
    forward matmul: gradients for the inputs and for the weights):

        flops_per_char = 3 * (sum_l 4 * (input_size_l + hidden) * hidden * 2
                              + hidden * vocab_size * 2)

    The embedding lookup, biases, gate nonlinearities, the loss and the optimizer update are not
    counted (they are not matmuls and are small next to them).
    """
    forward = 0
    for layer in range(num_layers):
        input_size = embed_dim if layer == 0 else hidden
        forward += 4 * (input_size + hidden) * hidden * 2
    forward += hidden * vocab_size * 2
    return 3 * forward


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _block(tree: Any) -> None:
    jax.block_until_ready(tree)


# --- The PyTorch peer ------------------------------------------------------------------------


def load_peer(name: str) -> ModuleType:
    """The peer's module, loaded from experiments/peers by path; `UsageError` if it cannot run."""
    if name != "pytorch":
        raise UsageError(f"Unknown peer {name!r}; known: {', '.join(PEERS)}.")
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"--compare=pytorch needs PyTorch, which does not import ({e}): "
            "pip install -e '.[peers]'"
        ) from None
    if not PEER_PATH.is_file():
        raise UserError(f"--compare=pytorch needs {PEER_PATH}, from a checkout of the repository.")
    spec = importlib.util.spec_from_file_location("lstm_jax_peer_pytorch", PEER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peer_device(platform: str) -> str:
    """The torch device that matches JAX's: CUDA when JAX trains on a GPU and torch has CUDA."""
    import torch

    return "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"


# --- Measurements ------------------------------------------------------------------------------


def measure_training(
    options: BenchOptions,
    devices: Sequence[jax.Device],
    *,
    peer: ModuleType | None = None,
    log: Callable[[str], None] = logging.info,
) -> tuple[dict[str, Any], dict[str, Any] | None, CharLSTM, Any]:
    """Time the pmapped train step; with `peer`, its windows alternate with the peer's.

    Returns (training numbers, peer numbers or None, the model, its initial parameters).
    """
    num_devices = len(devices)
    config = Config(
        embed_dim=options.embed_dim,
        hidden=options.hidden,
        num_layers=options.num_layers,
        seq_len=options.seq_len,
        global_batch=options.batch,
        # Pinned, not the training defaults, so the step matches the peer's: no dropout, Adam.
        dropout=0.0,
        optimizer="adam",
        weight_decay=0.0,
        learning_rate=LEARNING_RATE,
        grad_clip=GRAD_CLIP,
        dtype=options.dtype,
        remat=options.remat,
    )
    total_steps = 1 + options.warmup_steps + options.windows * options.steps_per_window
    model = build_model(config, options.vocab_size)
    init_key, dropout_key = jax.random.split(jax.random.key(0))
    params = init_params(model, init_key)
    state = create_train_state(model, params, config, total_steps, dropout_key)
    state = parallel.replicate(state, devices)
    carry = jax.tree.map(
        lambda c: parallel.shard(np.asarray(c), num_devices),
        model.initialize_carry(options.batch),
    )
    rng = np.random.default_rng(0)
    host_batches = [
        rng.integers(0, options.vocab_size, (options.batch, options.seq_len + 1), dtype=np.int32)
        for _ in range(NUM_HOST_BATCHES)
    ]
    log(f"Compiling the train step for {num_devices} device(s)...")
    start = time.perf_counter()
    # Compiled ahead of time, so that XLA's memory plan for the step can be read (also on CPU,
    # where the device reports no memory statistics).
    p_train_step = (
        parallel.train_step(devices)
        .lower(state, parallel.shard(host_batches[0], num_devices), carry, True)
        .compile()
    )
    memory_plan = p_train_step.memory_analysis()  # None where the backend does not report it.
    scratch_bytes = None if memory_plan is None else memory_plan.temp_size_in_bytes
    steps_done = 0

    def run_steps(count: int) -> None:
        nonlocal state, carry, steps_done
        for _ in range(count):
            batch = parallel.shard(host_batches[steps_done % len(host_batches)], num_devices)
            state, carry, _ = p_train_step(state, batch, carry, steps_done == 0)
            steps_done += 1
        _block((state, carry))

    run_steps(1)
    compile_seconds = time.perf_counter() - start
    run_steps(options.warmup_steps)

    peer_trainer = None
    if peer is not None:
        peer_device = _peer_device(devices[0].platform)
        peer_trainer = peer.build_trainer(
            vocab_size=options.vocab_size,
            embed_dim=options.embed_dim,
            hidden=options.hidden,
            num_layers=options.num_layers,
            batch=options.batch,
            seq_len=options.seq_len,
            device=peer_device,
            num_threads=os.cpu_count(),
        )
        peer_trainer.train_window(max(options.warmup_steps, 1))

    chars_per_window = options.batch * options.seq_len * options.steps_per_window
    window_seconds, peer_window_seconds = [], []
    for window in range(options.windows):
        start = time.perf_counter()
        run_steps(options.steps_per_window)
        window_seconds.append(time.perf_counter() - start)
        if peer_trainer is not None:
            peer_window_seconds.append(peer_trainer.train_window(options.steps_per_window))
        log(f"Training window {window + 1}/{options.windows} done.")

    memory = [device.memory_stats() for device in devices]
    peak_bytes = [stats.get("peak_bytes_in_use") for stats in memory if stats]
    training = {
        "compile_seconds": compile_seconds,
        "chars_per_second": chars_per_window / _median(window_seconds),
        "step_seconds": _median(window_seconds) / options.steps_per_window,
        "window_seconds": window_seconds,
        "window_chars_per_second": [chars_per_window / s for s in window_seconds],
        "peak_memory_bytes": max(peak_bytes) if peak_bytes and None not in peak_bytes else None,
        "step_scratch_bytes": scratch_bytes,
    }
    peer_numbers = None
    if peer_trainer is not None:
        import torch

        peer_numbers = {
            "peer": "pytorch",
            "torch_version": torch.__version__,
            "device": peer_device,
            "num_threads": torch.get_num_threads(),
            "chars_per_second": chars_per_window / _median(peer_window_seconds),
            "step_seconds": _median(peer_window_seconds) / options.steps_per_window,
            "window_seconds": peer_window_seconds,
            "window_chars_per_second": [chars_per_window / s for s in peer_window_seconds],
        }
    return training, peer_numbers, model, params


def measure_matmul_peak(
    devices: Sequence[jax.Device], size: int, runs: int = MATMUL_RUNS, dtype: str = "float32"
) -> dict[str, Any]:
    """FLOP/s of a jitted [size, size] @ [size, size] matmul in `dtype` on every device at once.

    The matmuls run side by side (one per device, sharded over the same devices as training),
    so the peak is the aggregate the training step could reach, also when several (fake) CPU
    devices share one processor. Default matmul precision, as in the model.
    """
    mesh = Mesh(np.asarray(devices), (parallel.AXIS,))
    sharding = NamedSharding(mesh, PartitionSpec(parallel.AXIS))
    shape = (len(devices), size, size)
    make = jax.jit(
        lambda key: jax.random.normal(key, shape, jnp.dtype(dtype)), out_shardings=sharding
    )
    a, b = make(jax.random.key(1)), make(jax.random.key(2))
    matmul = jax.jit(jnp.matmul, out_shardings=sharding)
    _block(matmul(a, b))  # Compile.
    run_seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        _block(matmul(a, b))
        run_seconds.append(time.perf_counter() - start)
    flops = len(devices) * 2 * size**3
    return {
        "size": size,
        "dtype": dtype,
        "run_seconds": run_seconds,
        "flops_per_second": flops / _median(run_seconds),
    }


def measure_generation(
    model: CharLSTM,
    params: Any,
    device: jax.Device,
    *,
    batch: int,
    length: int,
    runs: int,
) -> dict[str, Any]:
    """chars/s of `lstm_jax.sample.generate` for `batch` samples of `length` characters."""
    params = jax.device_put(params, device)
    prompt_ids = jax.device_put(jnp.zeros((batch, 1), jnp.int32), device)
    key = jax.device_put(jax.random.key(0), device)

    def call() -> float:
        start = time.perf_counter()
        _block(generate(model, params, prompt_ids, key, 1.0, length=length))
        return time.perf_counter() - start

    compile_seconds = call()
    run_seconds = [call() for _ in range(runs)]
    return {
        "batch": batch,
        "length": length,
        "compile_seconds": compile_seconds,
        "run_seconds": run_seconds,
        "chars_per_second": batch * length / _median(run_seconds),
    }


def run_benchmark(
    options: BenchOptions,
    *,
    peer: ModuleType | None = None,
    log: Callable[[str], None] = logging.info,
) -> dict[str, Any]:
    """Every measurement of one run, as a JSON-ready dict."""
    local = jax.local_devices()
    options.validate(len(local))
    devices = local[: options.devices or len(local)]
    platform = devices[0].platform
    matmul_size = options.matmul_size or (2048 if platform == "cpu" else 8192)

    training, peer_numbers, model, params = measure_training(options, devices, peer=peer, log=log)
    log(f"Timing a {matmul_size}x{matmul_size} {options.dtype} matmul for the peak FLOP/s...")
    matmul = measure_matmul_peak(devices, matmul_size, dtype=options.dtype)
    char_flops = flops_per_char(
        options.vocab_size, options.embed_dim, options.hidden, options.num_layers
    )
    training["flops_per_char"] = char_flops
    training["flops_per_second"] = char_flops * training["chars_per_second"]
    training["utilisation"] = training["flops_per_second"] / matmul["flops_per_second"]

    generation = {}
    for batch in GENERATE_BATCHES:
        log(f"Timing generation at batch {batch}...")
        generation[f"batch_{batch}"] = measure_generation(
            model,
            params,
            devices[0],
            batch=batch,
            length=options.generate_length,
            runs=options.windows,
        )

    comparison = None
    if peer_numbers is not None:
        comparison = {
            **peer_numbers,
            "jax_chars_per_second": training["chars_per_second"],
            "jax_over_peer": training["chars_per_second"] / peer_numbers["chars_per_second"],
        }
    return {
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "platform": platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "cpu_count": os.cpu_count(),
        "sizes": {
            "hidden": options.hidden,
            "num_layers": options.num_layers,
            "embed_dim": options.embed_dim,
            "vocab_size": options.vocab_size,
            "batch": options.batch,
            "seq_len": options.seq_len,
            "dtype": options.dtype,
            "remat": options.remat,
            "parameters": count_params(params),
        },
        "settings": {
            "warmup_steps": options.warmup_steps,
            "windows": options.windows,
            "steps_per_window": options.steps_per_window,
            "generate_length": options.generate_length,
            "optimizer": "adam",
            "learning_rate": LEARNING_RATE,
            "grad_clip": GRAD_CLIP,
            "dropout": 0.0,
        },
        "train": training,
        "matmul": matmul,
        "generate": generation,
        "compare": comparison,
    }


# --- Output ------------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def format_table(results: dict[str, Any]) -> str:
    """The run's headline numbers as an aligned two-column table."""
    sizes, train, matmul = results["sizes"], results["train"], results["matmul"]
    peak_memory, scratch = train["peak_memory_bytes"], train["step_scratch_bytes"]
    rows = [
        ("device", f"{results['device_kind']} x{results['num_devices']} ({results['platform']})"),
        ("jax", results["jax_version"]),
        (
            "model",
            f"{sizes['num_layers']}x{sizes['hidden']} LSTM, embed {sizes['embed_dim']}, "
            f"vocab {sizes['vocab_size']}, {sizes['parameters']:,} parameters, {sizes['dtype']}"
            + (", --remat" if sizes["remat"] else ""),
        ),
        ("batch", f"{sizes['batch']} x {sizes['seq_len']} characters"),
        ("train compile (first call)", f"{train['compile_seconds']:.2f} s"),
        ("train chars/s (median)", f"{train['chars_per_second']:,.0f}"),
        ("train step time (median)", f"{train['step_seconds'] * 1e3:.2f} ms"),
        ("peak device memory", "n/a" if peak_memory is None else _si(peak_memory, "B")),
        (
            "train step scratch memory (XLA)",
            "n/a" if scratch is None else _si(scratch, "B"),
        ),
        ("model FLOPs per char", f"{train['flops_per_char']:,}"),
        ("achieved", _si(train["flops_per_second"], "FLOP/s")),
        (
            f"matmul peak ({matmul['size']}^2 {matmul['dtype']})",
            _si(matmul["flops_per_second"], "FLOP/s"),
        ),
        ("utilisation", f"{train['utilisation']:.1%}"),
    ]
    for name, numbers in results["generate"].items():
        rows.append(
            (
                f"generate {name.replace('_', ' ')}",
                f"{numbers['chars_per_second']:,.0f} chars/s "
                f"(compile {numbers['compile_seconds']:.2f} s)",
            )
        )
    compare = results["compare"]
    if compare is not None:
        rows += [
            (
                f"{compare['peer']} chars/s (median)",
                f"{compare['chars_per_second']:,.0f} (torch {compare['torch_version']}, "
                f"{compare['device']}, {compare['num_threads']} threads)",
            ),
            (f"jax / {compare['peer']}", f"{compare['jax_over_peer']:.2f}x"),
        ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


# --- Command line ------------------------------------------------------------------------------


def bench_options_from_flags() -> BenchOptions:
    return BenchOptions(
        hidden=_HIDDEN.value,
        num_layers=_NUM_LAYERS.value,
        embed_dim=_EMBED_DIM.value,
        vocab_size=_VOCAB_SIZE.value,
        batch=_BATCH.value,
        seq_len=_SEQ_LEN.value,
        dtype=_DTYPE.value,
        warmup_steps=_WARMUP_STEPS.value,
        windows=_WINDOWS.value,
        steps_per_window=_STEPS_PER_WINDOW.value,
        generate_length=_GENERATE_LENGTH.value,
        matmul_size=_MATMUL_SIZE.value,
        compare=_COMPARE.value,
        devices=_DEVICES.value,
        remat=_REMAT.value,
    )


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.INFO)
    try:
        if len(argv) > 1:
            raise UsageError(
                f"Unexpected arguments: {' '.join(argv[1:])}; flags look like --name=value."
            )
        options = bench_options_from_flags()
        options.validate(jax.local_device_count())  # Before loading torch or compiling.
        peer = load_peer(options.compare) if options.compare else None
        results = run_benchmark(options, peer=peer)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(format_table(results))
    json_path = Path(_JSON.value).expanduser()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    logging.info("Wrote %s.", json_path)


if __name__ == "__main__":
    jax.config.config_with_absl()
    pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.WARNING)
    app.run(main)
