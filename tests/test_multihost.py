"""Multi-process training: 2 processes x 2 CPU devices (gloo) train what 1 process x 4 does.

The 2-process job runs through `launch/local.sh`, the way hosts of a TPU slice run it: each
process builds only its rows of every batch and the gradient mean spans both. Its checkpoints
must resume in one process and the reverse. Float sums over devices are reduced in another
order across processes, so parameters agree to ATOL, not bit for bit (measured: about 1e-7).
"""

import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from builders import make_model
from subprocesses import ROOT, command_env

from lstm_jax import distributed
from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.errors import UsageError
from lstm_jax.models import init_params
from lstm_jax.train import train_and_evaluate

ATOL = 1e-5
# Dropout on and carried state, so the per-device dropout keys and the gathered carry matter.
# A constant schedule lets a run continue past the num_steps it was started with.
SETTINGS = {
    "embed_dim": 8,
    "hidden": 16,
    "num_layers": 2,
    "seq_len": 16,
    "global_batch": 8,
    "dropout": 0.1,
    "learning_rate": 1e-2,
    "warmup_steps": 2,
    "schedule": "constant",
    "log_every": 1,
    "eval_every": 1000,
    "checkpoint_every": 1000,
    "length": 10,
}


def _local_sh(workdir, text_path, num_steps: int) -> subprocess.Popen:
    flags = {**SETTINGS, "num_steps": num_steps, "data_path": text_path, "workdir": workdir}
    return subprocess.Popen(
        ["bash", str(ROOT / "launch" / "local.sh"), "2", *(f"--{k}={v}" for k, v in flags.items())],
        cwd=ROOT,
        env={
            **command_env(compile_cache=False),
            "DEVICES_PER_PROCESS": "2",
            "PYTHON": sys.executable,
            "LOG_DIR": str(workdir) + ".logs",
            "PYTHONUNBUFFERED": "1",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # local.sh passes it on to every process, which saves and exits.
        process.communicate(timeout=60)
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def _one_process(config, workdir, num_steps):
    """The same job in this process, on 4 of conftest's 8 fake devices."""
    run = config.replace(workdir=str(workdir), num_steps=num_steps)
    return train_and_evaluate(run, devices=jax.local_devices()[:4])


def _params(workdir, step: int):
    checkpoints = Checkpoints(workdir, read_only=True)
    vocab_size = len(checkpoints.read_meta(step)["vocab"])
    model = make_model(vocab_size, embed_dim=8, hidden=16, num_layers=2)
    abstract = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.device_get(checkpoints.restore_params(step, abstract_like(abstract, sharding)))


def _max_abs_diff(a, b) -> float:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives: Linux only here")
def test_two_processes_match_one_and_resume_each_other(small_text_path, tmp_path):
    from lstm_jax.config import Config

    config = Config.create(data_path=str(small_text_path), **SETTINGS)
    two, one = tmp_path / "two_processes", tmp_path / "one_process"

    # 4 steps each way: same parameters.
    _finish(_local_sh(two, small_text_path, num_steps=4))
    _one_process(config, one, num_steps=4)
    first_diff = _max_abs_diff(_params(two, 4), _params(one, 4))
    assert first_diff <= ATOL

    # The 1-process checkpoint resumes in 2 processes; SIGTERM to one process (a preemption
    # notice) stops both after the same step, with a checkpoint of it.
    process = _local_sh(one, small_text_path, num_steps=10_000)
    pids, lines = [], []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("local.sh:") and "pids" in line:
            pids = [int(p) for p in line.split("(pids ")[1].split(")")[0].split()]
        elif " | train " in line and int(line.split("step ")[1].split("/")[0]) >= 6:
            os.kill(pids[1], signal.SIGTERM)
            break
    stderr = "".join(lines) + _finish(process)
    assert "Stopped by a preemption notice (SIGTERM)" in stderr, stderr[-3000:]
    stop_step = Checkpoints(one, read_only=True).latest_step()
    assert stop_step > 6
    assert "Resuming from step 4" in stderr

    # The 2-process checkpoint resumes in 1 process, to the same step; both equal a 1-process
    # run that was never interrupted.
    resumed = _one_process(config, two, num_steps=stop_step)
    assert resumed.step == stop_step
    straight = _one_process(config, tmp_path / "straight", num_steps=stop_step)
    one_to_two = _max_abs_diff(_params(one, stop_step), straight.params)
    two_to_one = _max_abs_diff(resumed.params, straight.params)
    print(
        f"max |params difference|: 2x2 vs 1x4 after 4 steps {first_diff:.2e}; after "
        f"{stop_step} steps, 1->2 processes {one_to_two:.2e}, 2->1 processes {two_to_one:.2e}"
    )
    assert one_to_two <= ATOL and two_to_one <= ATOL


def test_local_sh_exits_with_the_processes_error(small_text_path, tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), "2", "--dropout=1.5"],
        cwd=ROOT,
        env={
            **command_env(compile_cache=False),
            "PYTHON": sys.executable,
            "LOG_DIR": str(tmp_path / "logs"),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--dropout must be in [0, 1)" in result.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        ({"distributed": "off", "coordinator_address": "127.0.0.1:1"}, "contradicts"),
        ({"coordinator_address": "127.0.0.1:1"}, "all three"),
        ({"num_processes": 2, "process_id": 0}, "all three"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "[0, 2)"),
        ({"distributed": "sometimes"}, "auto, on, off"),
    ],
)
def test_distributed_flags_that_cannot_form_a_job_are_refused(options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        distributed.initialize(distributed.DistributedOptions(**options))


def test_auto_runs_alone_off_a_cloud_tpu(monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", _must_not_be_called)
    assert distributed.initialize(distributed.DistributedOptions("auto")) is False
    assert distributed.initialize(distributed.DistributedOptions("off")) is False


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("jax.distributed.initialize was called")
