"""Faults really injected: SIGTERM mid-run, SIGKILL mid-save, damaged checkpoints, divergence.

Each promise is checked through the real command line in subprocesses.
"""

import random
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from builders import make_model
from subprocesses import run_module, start_module

from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.models import init_params


def _train_args(text_path: Path, workdir: Path, **overrides) -> list[str]:
    flags = {
        "data_path": text_path,
        "workdir": workdir,
        "embed_dim": 8,
        "hidden": 32,
        "num_layers": 2,
        "seq_len": 16,
        "global_batch": 8,
        "dropout": 0.1,
        "num_steps": 120,
        "log_every": 1,
        "eval_every": 1000,
        "checkpoint_every": 40,
        "length": 10,
    }
    flags.update(overrides)
    return ["lstm_jax.main", *(f"--{k}={v}" for k, v in flags.items())]


def _final_params(workdir: Path, step: int, hidden: int = 32, vocab_size: int | None = None):
    checkpoints = Checkpoints(workdir, read_only=True)
    meta = checkpoints.read_meta(step)
    model = make_model(len(meta["vocab"]), embed_dim=8, hidden=hidden, num_layers=2)
    abstract = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.device_get(checkpoints.restore_params(step, abstract_like(abstract, sharding)))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _run_until_step_then_signal(args: list[str], step: int, sig: int) -> tuple[int, str]:
    process = start_module(*args)
    lines = []
    sent = False
    for line in process.stderr:
        lines.append(line)
        if not sent and " | train " in line:
            logged = int(line.split("step ")[1].split("/")[0])
            if logged >= step:
                process.send_signal(sig)
                sent = True
    process.wait(timeout=120)
    assert sent, "the run ended before the signal could be sent:\n" + "".join(lines[-20:])
    return process.returncode, "".join(lines)


@pytest.mark.parametrize(
    "sig, num_stops",
    [
        # Three preemptions in one run: under `-m slow` (the multi-host test stops on SIGTERM).
        pytest.param(signal.SIGTERM, 3, id="SIGTERM", marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, 1, id="SIGINT"),
    ],
)
def test_signal_mid_run_saves_that_step_exits_0_and_resume_is_bit_identical(
    small_text_path, tmp_path, sig, num_stops
):
    # SIGTERM (a preempted VM) and SIGINT (Ctrl-C) alike: finish the step in flight, save it,
    # exit 0; the same command resumes from that step to the uninterrupted run's parameters.
    straight = tmp_path / "straight"
    result = run_module(*_train_args(small_text_path, straight))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = _final_params(straight, 120)

    rng = random.Random(1234)
    stop_steps = sorted(rng.sample(range(5, 110), num_stops))
    name = signal.Signals(sig).name
    for i, stop_at in enumerate(stop_steps):
        workdir = tmp_path / f"interrupted_{i}"
        args = _train_args(small_text_path, workdir)
        code, log = _run_until_step_then_signal(args, stop_at, sig)
        assert code == 0, log[-2000:]
        assert f"Stopped by {name} after step" in log and "Traceback" not in log
        stopped = int(log.split(f"Stopped by {name} after step ")[1].split(";")[0])
        assert stop_at <= stopped < 120
        # Saved at the step it stopped after, not only at the last periodic save (every 40).
        assert Checkpoints(workdir, read_only=True).latest_step() == stopped
        resumed = run_module(*args)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"Resuming from step {stopped}" in resumed.stderr
        _assert_trees_equal(expected, _final_params(workdir, 120))


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(small_text_path, tmp_path):
    # A wide layer makes each save tens of MB, so the kill lands while files are being written.
    workdir = tmp_path / "run"
    args = _train_args(
        small_text_path, workdir, hidden=1024, num_layers=1, num_steps=40, checkpoint_every=10,
        log_every=10,
    )
    checkpoint_root = workdir / "checkpoints"
    process = start_module(*args, compile_cache=False)  # It is killed: see conftest.py.
    killed_during = None
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        complete = checkpoint_root.is_dir() and any(
            p.name == "10" for p in checkpoint_root.iterdir()
        )
        if complete:
            partial = [p for p in checkpoint_root.iterdir() if "orbax-checkpoint-tmp" in p.name]
            if partial:
                process.kill()
                killed_during = partial[0].name
                break
        time.sleep(0.001)
    process.wait(timeout=60)
    if killed_during is None:
        pytest.fail("never saw a save in progress to kill")
    assert process.returncode == -signal.SIGKILL
    saved = Checkpoints(workdir, read_only=True).steps()
    assert saved and max(saved) < int(killed_during.split(".")[0])

    # Resumed only as far as the step whose save was killed: the steps of a 1024-wide layer after
    # it would add nothing but time.
    killed_step = int(killed_during.split(".")[0])
    resumed = run_module(*args, f"--num_steps={killed_step}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Removing the unfinished save" in resumed.stderr and killed_during in resumed.stderr
    assert f"Resuming from step {max(saved)}" in resumed.stderr
    assert Checkpoints(workdir, read_only=True).latest_step() == killed_step


def test_damaged_checkpoint_is_skipped_with_a_warning_naming_it(small_text_path, tmp_path):
    workdir = tmp_path / "run"
    args = _train_args(small_text_path, workdir, num_steps=80)
    assert run_module(*args).returncode == 0
    # Truncate one array file of the newest step (80); 40 stays whole.
    victim = next((workdir / "checkpoints" / "80" / "state" / "d").iterdir())
    victim.write_bytes(victim.read_bytes()[:10])
    resumed = run_module(*_train_args(small_text_path, workdir, num_steps=90))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Checkpoint {workdir / 'checkpoints'}/80 is unreadable" in resumed.stderr
    assert "Resuming from step 40" in resumed.stderr
    assert any(p.name.startswith("checkpoints.unreadable-80") for p in workdir.iterdir())


def test_no_usable_checkpoint_is_one_clear_error(small_text_path, tmp_path):
    workdir = tmp_path / "run"
    args = _train_args(small_text_path, workdir, num_steps=40)
    assert run_module(*args).returncode == 0
    for step in (workdir / "checkpoints").iterdir():
        for meta_file in (step / "meta").iterdir():
            meta_file.write_text("{ not json")
    result = run_module(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "--restart" in errors[0]


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    small_text_path, tmp_path
):
    workdir = tmp_path / "run"
    assert run_module(*_train_args(small_text_path, workdir, num_steps=40)).returncode == 0
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    # An absurd learning rate overflows float32 within a few steps.
    result = run_module(
        *_train_args(
            small_text_path,
            workdir,
            num_steps=100,
            learning_rate=1e38,
            warmup_steps=0,
            schedule="constant",
            log_every=5,
        )
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert "non-finite between steps 41 and" in errors[0] and "--learning_rate" in errors[0]
    assert "kept as they were (the next run resumes from step 40)" in errors[0]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_resuming_with_another_optimizer_structure_is_refused_untouched(small_text_path, tmp_path):
    workdir = tmp_path / "run"
    assert run_module(*_train_args(small_text_path, workdir, num_steps=40)).returncode == 0
    before = sorted(p.name for p in workdir.iterdir())
    result = run_module(*_train_args(small_text_path, workdir, num_steps=80, grad_clip=0))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "grad_clip_on True (saved) vs False (now)" in errors[0]
    assert sorted(p.name for p in workdir.iterdir()) == before
