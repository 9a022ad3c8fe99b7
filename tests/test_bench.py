"""The benchmark command, end to end in subprocesses with a tiny model: numbers, not speed.

Only correctness is checked (positive rates, the analytic FLOPs, a sane utilisation, clear
errors); the sizes are far too small for the timings to mean anything. The FLOPs each cell
counts are checked in-process against the closed form and against XLA's own count.
"""

import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import pytest
from subprocesses import ROOT, command_env, run_module

from lstm_jax import bench, cli, memory
from lstm_jax.cells import CELLS
from lstm_jax.config import ModelConfig
from lstm_jax.errors import UserError
from lstm_jax.models import build_model, count_params, forward_flops_per_char, init_params

TINY = {
    "hidden": 32,
    "num_layers": 1,
    "embed_dim": 64,
    "vocab_size": 96,
    "global_batch": 8,
    "seq_len": 16,
}
TINY_FLAGS = [f"--{name}={value}" for name, value in TINY.items()] + [
    "--windows=2",
    "--steps_per_window=2",
    "--generate_length=20",
]
# The model settings besides TINY's, as the JSON reports them.
DEFAULT_MODEL = {
    "cell": "lstm", "residual": False, "layer_norm": False, "tie_embeddings": False,
    "mogrifier_rounds": 5, "mogrifier_rank": 0,
    "block": "plain", "mlp_ratio": 0.0, "rglru_conv_width": 4,  # Issue 27, items 4 and 2.
    "mlstm_heads": 0, "mlstm_chunk": 0, "mlstm_forget": "sigmoid",  # Issue 27, item 1.
    "attention_window": 0, "attention_heads": 0,  # Issue 27, item 3.
}  # fmt: skip
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _tiny_flops_per_char() -> int:
    """The LSTM's closed form, written out for TINY: one layer, input embed_dim."""
    hidden, embed, vocab = TINY["hidden"], TINY["embed_dim"], TINY["vocab_size"]
    forward = 4 * (embed + hidden) * hidden * 2 + hidden * vocab * 2
    return 3 * forward


def _lstm_closed_form(vocab_size: int, embed_dim: int, hidden: int, num_layers: int) -> int:
    """Training FLOPs per character of the LSTM as bench counted them before cells did:
    3 * (sum over layers of 4 gates * (input + hidden) * hidden * 2 + hidden * vocab * 2)."""
    forward = 0
    for layer in range(num_layers):
        input_size = embed_dim if layer == 0 else hidden
        forward += 4 * (input_size + hidden) * hidden * 2
    return 3 * (forward + hidden * vocab_size * 2)


def _bench(tmp_path, *extra_flags: str) -> tuple[dict, subprocess.CompletedProcess]:
    json_path = tmp_path / "bench.json"
    result = run_module("lstm_jax.bench", *TINY_FLAGS, f"--json={json_path}", *extra_flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(json_path.read_text()), result


def test_bench_reports_speeds_analytic_flops_and_utilisation(tmp_path):
    results, run = _bench(tmp_path)
    train = results["train"]
    assert train["chars_per_second"] > 0 and train["step_seconds"] > 0
    assert train["compile_seconds"] > 0
    assert len(train["window_seconds"]) == 2
    assert train["flops_per_char"] == _tiny_flops_per_char() == 92_160
    assert train["flops_per_second"] == pytest.approx(
        train["flops_per_char"] * train["chars_per_second"]
    )
    assert 0 < train["utilisation"] < 1.5
    assert results["matmul"]["flops_per_second"] > 0
    for batch in (1, 64):
        generation = results["generate"][f"batch_{batch}"]
        assert generation["chars_per_second"] > 0 and generation["compile_seconds"] > 0
    assert results["sizes"] == {
        **TINY,
        **DEFAULT_MODEL,
        "dtype": "float32",
        "remat": False,
        "scan": "layered",
        "unroll": 1,
        "hoist_input": False,
        "parameters": 21_728,
    }
    assert results["settings"]["optimizer"] == "adam" and results["settings"]["dropout"] == 0.0
    assert train["step_scratch_bytes"] > 0  # XLA's memory plan, which the CPU backend reports.
    assert results["num_devices"] == 1 and results["device_kind"] and results["jax_version"]
    assert results["compare"] is None
    assert "utilisation" in run.stdout and "train chars/s" in run.stdout


@pytest.mark.skipif(
    not HAS_TORCH,
    reason="optional: CI does not install torch; run with pip install -e '.[peers]'",
)
def test_compare_pytorch_alternates_windows_and_reports_a_ratio(tmp_path):
    results, run = _bench(tmp_path, "--compare=pytorch")
    compare = results["compare"]
    assert compare["peer"] == "pytorch" and compare["torch_version"]
    assert len(compare["window_seconds"]) == len(results["train"]["window_seconds"]) == 2
    assert compare["chars_per_second"] > 0
    assert compare["jax_over_peer"] > 0
    assert compare["jax_over_peer"] == pytest.approx(
        results["train"]["chars_per_second"] / compare["chars_per_second"]
    )
    assert "jax / pytorch" in run.stdout


def test_compare_without_torch_says_how_to_install_it(tmp_path):
    (tmp_path / "torch.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = command_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "lstm_jax.bench", *TINY_FLAGS, "--compare=pytorch"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "pip install -e '.[peers]'" in result.stderr and "Traceback" not in result.stderr


def test_bfloat16_is_measured_against_a_bfloat16_peak(tmp_path):
    results, _ = _bench(tmp_path, "--dtype=bfloat16")
    assert results["sizes"]["dtype"] == "bfloat16" and results["matmul"]["dtype"] == "bfloat16"
    assert results["train"]["chars_per_second"] > 0


def test_bfloat16_with_the_float32_peer_is_refused_in_one_line(tmp_path):
    result = run_module(
        "lstm_jax.bench", *TINY_FLAGS, "--dtype=bfloat16", "--compare=pytorch", timeout=120
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "float32" in error_lines[0]
    assert "Traceback" not in result.stderr


def test_compare_pytorch_refuses_other_cells_in_one_line():
    result = run_module("lstm_jax.bench", *TINY_FLAGS, "--cell=gru", "--compare=pytorch")
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "--cell=gru" in error_lines[0] and "nn.LSTM" in error_lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("cell", ["gru", "minlstm"])
def test_bench_times_other_cells(tmp_path, cell):
    results, run = _bench(tmp_path, f"--cell={cell}", "--matmul_size=256")
    assert results["sizes"]["cell"] == cell
    model = ModelConfig(cell=cell, embed_dim=64, hidden=32, num_layers=1)
    assert results["train"]["flops_per_char"] == 3 * forward_flops_per_char(model, 96)
    assert results["train"]["chars_per_second"] > 0
    assert results["generate"]["batch_64"]["chars_per_second"] > 0
    assert f"1x32 {cell}" in run.stdout and "train chars/s" in run.stdout
    assert "utilisation" in run.stdout


BAD_BENCH = [
    # (args, the one error line's phrase): each refused before anything is compiled.
    (["--vocab_size=0"], "--vocab_size must be > 0, got 0."),
    (["--windows=0"], "--windows must be > 0, got 0."),
    (["--steps_per_window=-2"], "--steps_per_window must be > 0, got -2."),
    (["--generate_length=0"], "--generate_length must be > 0, got 0."),
    (["--untimed_steps=-1"], "--untimed_steps must be >= 0, got -1."),
    (["--matmul_size=-1"], "--matmul_size must be >= 0, got -1."),
    (["--devices=-1"], "--devices must be >= 0, got -1."),
    (["--hidden=0"], "--hidden must be > 0, got 0."),  # A training setting, timed by bench.
    (["--learning_rate=nan"], "--learning_rate must be a finite number > 0, got nan."),
    # The training command's population flags: bench's is --population, so these would be
    # parsed and silently ignored.
    (["--seeds=2"], "drop --seeds and --grid"),
    (["--grid=dropout=0.1,0.2"], "drop --seeds and --grid"),
]


@pytest.mark.parametrize("args, phrase", BAD_BENCH, ids=[b[1].split()[0] for b in BAD_BENCH])
def test_bench_refuses_sizes_out_of_range_in_one_line(tmp_path, args, phrase):
    result = run_module("lstm_jax.bench", *TINY_FLAGS, f"--json={tmp_path}/b.json", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "b.json").exists()
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and phrase in error_lines[0], result.stderr[-2000:]


def test_help_lists_the_training_and_bench_flags_by_section():
    result = run_module("lstm_jax.bench", "--help", timeout=120)  # absl exits 1 after --help.
    assert "Traceback" not in result.stderr
    for group in ("model:", "data:", "optim:", "bench:"):
        assert f"\n{group}" in result.stdout
    for flag in ("--cell", "--global_batch", "--untimed_steps", "--compare", "--json"):
        assert f"  {flag}: " in result.stdout
    assert "(default: 'adam')" in result.stdout  # The peer's step, not the training default.
    assert "jax_" not in result.stdout


# --- Refused before the run: where the numbers go, sizes beyond memory ---------------------------


def _refused_before_the_run(result: subprocess.CompletedProcess, exit_code: int) -> str:
    """The one error line of a command that stopped before compiling anything."""
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Compiling" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return error


@pytest.mark.parametrize(
    "where, why",
    [(".", "is a folder"), ("missing/bench.json", "missing does not exist"),
     ("file/bench.json", "file is not a folder")],
)  # fmt: skip
def test_json_that_cannot_be_written_is_refused_before_the_run(tmp_path, where, why):
    (tmp_path / "file").write_text("in the way\n")
    before = sorted(tmp_path.rglob("*"))
    result = run_module("lstm_jax.bench", *TINY_FLAGS, f"--json={tmp_path / where}", timeout=120)
    error = _refused_before_the_run(result, exit_code=1)
    assert error.startswith(f"error: --json={(tmp_path / where).resolve()}") and why in error
    assert sorted(tmp_path.rglob("*")) == before  # Nothing written, no folder made.


@pytest.mark.parametrize(
    "sizes, lower",
    [(["--hidden=1000000"], "Lower --hidden or --num_layers"),
     (["--global_batch=100000", "--seq_len=100000"], "Lower --global_batch or --seq_len")],
)  # fmt: skip
def test_sizes_beyond_the_machines_memory_are_refused_before_the_run(tmp_path, sizes, lower):
    json_path = tmp_path / "bench.json"
    result = run_module("lstm_jax.bench", f"--json={json_path}", *sizes, timeout=120)
    error = _refused_before_the_run(result, exit_code=2)
    assert "more than this machine's" in error and error.endswith(f"{lower}.")
    assert all(size in error for size in sizes) and not json_path.exists()


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_memory_estimate_counts_the_parameters_of_every_cell(cell):
    """Weights = parameters x (the parameter, its gradient, 2 Adam moments) x 4 bytes, within 3%
    (biases and norms are left out); the sizes a bench runs by default fit easily."""
    config = bench.BenchConfig.create(cell=cell, hidden=128, num_layers=2)
    model = build_model(config, 96)
    shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    weights = memory.training_bytes(config, 96)["weights"]
    assert weights == pytest.approx(4 * 4 * count_params(shapes), rel=0.03)
    memory.refuse_sizes_beyond_memory(bench.BenchConfig(), 96)  # No error.


@pytest.mark.parametrize("batch, length", [(1, 100_000), (8, 200_000), (64, 100_000)])
def test_generation_and_matmul_estimates_are_xlas_memory_plans(batch, length):
    """What bench's matmul and generation allocate, by XLA's own plan of the compiled programs
    (arguments, outputs and scratch), is what `lstm_jax.memory` estimates before compiling."""
    from lstm_jax.generate import generate

    model = build_model(bench.BenchConfig.create(hidden=16, num_layers=1, embed_dim=8), 96)
    params = init_params(model, jax.random.key(0))
    prompt = jnp.zeros((batch, 1), jnp.int32)
    compiled = generate.lower(model, params, prompt, jax.random.key(0), 1.0, length=length)
    plan = compiled.compile().memory_analysis()
    planned = plan.temp_size_in_bytes + plan.output_size_in_bytes
    assert memory.generation_need(batch, length).size == pytest.approx(planned, rel=0.02)
    side = 64 * batch
    matmul = jax.jit(jnp.matmul).lower(*[jax.ShapeDtypeStruct((1, side, side), jnp.float32)] * 2)
    plan = matmul.compile().memory_analysis()
    planned = plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
    assert memory.matmul_need(side, 1, "float32").size == planned


def test_json_in_a_folder_that_cannot_be_written_is_a_user_error(tmp_path, monkeypatch):
    def refuse(**options):  # What a read-only folder does (the tests may run as root).
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(UserError, match=r"^--json=.* cannot be written \(Permission denied\)"):
        cli.writable_file_flag("json", str(tmp_path / "bench.json"))


def test_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    cli.write_atomically(path, '{"old": 1}\n')
    assert path.read_text() == '{"old": 1}\n'

    def fail(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(UserError, match="No space left on device"):
        cli.write_atomically(path, '{"new": 2}\n')
    assert path.read_text() == '{"old": 1}\n' and sorted(tmp_path.iterdir()) == [path]


# --- FLOPs per character, from the cells --------------------------------------------------------


@pytest.mark.parametrize(
    "embed_dim, hidden, num_layers, vocab_size",
    [(64, 512, 2, 96), (64, 32, 1, 96), (16, 128, 3, 65), (256, 256, 1, 40)],
)
def test_lstm_flops_per_char_is_the_closed_form(embed_dim, hidden, num_layers, vocab_size):
    model = ModelConfig(cell="lstm", embed_dim=embed_dim, hidden=hidden, num_layers=num_layers)
    expected = _lstm_closed_form(vocab_size, embed_dim, hidden, num_layers)
    assert 3 * forward_flops_per_char(model, vocab_size) == expected


def test_one_hot_input_counts_the_vocabulary_as_the_first_layers_input():
    model = ModelConfig(cell="lstm", embed_dim=0, hidden=64, num_layers=2)
    assert 3 * forward_flops_per_char(model, 96) == _lstm_closed_form(96, 96, 64, 2)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_every_cell_counts_flops_that_grow_with_hidden(cell):
    step = [CELLS[cell](hidden, parent=None).flops_per_step(64) for hidden in (32, 64, 128)]
    assert 0 < step[0] < step[1] < step[2]
    model = [ModelConfig(cell=cell, hidden=hidden, num_layers=2) for hidden in (32, 64)]
    assert 0 < forward_flops_per_char(model[0], 96) < forward_flops_per_char(model[1], 96)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cell_step_flops_match_xla_cost_analysis(cell):
    """XLA counts every op of one compiled step (elementwise ones too); the matmuls the cell
    counts must be nearly all of it at this width."""
    batch, hidden, input_dim = 8, 256, 256
    module = CELLS[cell](hidden)
    carry, x = module.init_carry(batch), jnp.ones((batch, input_dim), jnp.float32)
    variables = module.init(jax.random.key(0), carry, x)
    compiled = jax.jit(module.apply).lower(variables, carry, x).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    counted = batch * CELLS[cell](hidden, parent=None).flops_per_step(input_dim)
    assert counted == pytest.approx(xla_flops, rel=0.1)


# --- The --compare path, without PyTorch -------------------------------------------------------


class _StandInTrainer:
    """What bench needs of the peer's trainer, without PyTorch: it counts its steps."""

    def __init__(self, **sizes):
        self.sizes, self.steps, self.device = sizes, [], types.SimpleNamespace(type=sizes["device"])

    def train_window(self, steps: int) -> float:
        self.steps.append(steps)
        return 0.5


def test_compare_alternates_windows_with_the_peer_built_at_the_same_sizes(monkeypatch):
    """The --compare path in-process, with stand-ins for torch and the peer's module."""
    trainers = []

    def build_trainer(**sizes):
        trainers.append(_StandInTrainer(**sizes))
        return trainers[-1]

    peer = types.SimpleNamespace(build_trainer=build_trainer)
    fake_torch = types.SimpleNamespace(
        __version__="0.0-stand-in",
        cuda=types.SimpleNamespace(is_available=lambda: False),
        get_num_threads=lambda: 3,
    )
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    config = bench.BenchConfig.create(hidden=32, num_layers=1, global_batch=8, seq_len=16)
    options = bench.BenchOptions(
        untimed_steps=1, windows=2, steps_per_window=2, generate_length=5, matmul_size=64,
        compare="pytorch", devices=1,
    )  # fmt: skip
    results = bench.run_benchmark(config, options, peer=peer, log=lambda _: None)
    (trainer,) = trainers
    assert trainer.sizes == {
        "vocab_size": 96, "embed_dim": 64, "hidden": 32, "num_layers": 1, "batch": 8,
        "seq_len": 16, "device": "cpu", "num_threads": os.cpu_count(),
    }  # fmt: skip
    assert trainer.steps == [1, 2, 2]  # Warm-up, then one peer window after each JAX window.
    compare = results["compare"]
    assert compare["window_seconds"] == [0.5, 0.5] and compare["step_seconds"] == 0.25
    assert compare["chars_per_second"] == 8 * 16 * 2 / 0.5
    assert compare["torch_version"] == "0.0-stand-in" and compare["num_threads"] == 3
    assert compare["jax_over_peer"] == pytest.approx(
        results["train"]["chars_per_second"] / compare["chars_per_second"]
    )
    assert "jax / pytorch" in bench.format_table(results)


def test_bench_population_counts_every_members_characters(tmp_path):
    results, run = _bench(tmp_path, "--population=3")
    train = results["train"]
    # Each window trains 3 members x batch x seq_len x steps characters in window_seconds.
    chars = 3 * TINY["global_batch"] * TINY["seq_len"] * 2
    median = statistics.median(train["window_seconds"])
    assert train["chars_per_second"] == pytest.approx(chars / median)
    assert train["chars_per_second_per_member"] == pytest.approx(train["chars_per_second"] / 3)
    assert train["population"] == 3 and "each data parallel over 1" in train["population_layout"]
    assert train["utilisation"] == pytest.approx(
        train["flops_per_char"] * train["chars_per_second"] / results["matmul"]["flops_per_second"]
    )
    assert "train chars/s per member" in run.stdout


def test_bench_population_beyond_memory_is_refused_before_compiling(tmp_path):
    run = run_module(
        "lstm_jax.bench", "--population=4096", "--hidden=4096", "--json=" + str(tmp_path / "b.json")
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: A population of 4096 members")
    assert not (tmp_path / "b.json").exists()
