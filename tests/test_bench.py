"""The benchmark command, end to end in subprocesses with a tiny model: numbers, not speed.

Only correctness is checked (positive rates, the analytic FLOPs, a sane utilisation, clear
errors); the sizes are far too small for the timings to mean anything.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from subprocesses import ROOT, command_env, run_module

TINY = {"hidden": 32, "num_layers": 1, "embed_dim": 64, "vocab_size": 96, "batch": 8, "seq_len": 16}
TINY_FLAGS = [f"--{name}={value}" for name, value in TINY.items()] + [
    "--windows=2",
    "--steps_per_window=2",
    "--generate_length=20",
]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _tiny_flops_per_char() -> int:
    """The docstring's formula, written out for TINY: one layer, input embed_dim."""
    hidden, embed, vocab = TINY["hidden"], TINY["embed_dim"], TINY["vocab_size"]
    forward = 4 * (embed + hidden) * hidden * 2 + hidden * vocab * 2
    return 3 * forward


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
    assert results["sizes"] == {**TINY, "dtype": "float32", "remat": False, "parameters": 21_728}
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
