"""Multi-process training: 2 processes x 2 CPU devices (gloo) train what 1 process x 4 does.

The 2-process job runs through `launch/local.sh`, the way hosts of a TPU slice run it: each
process builds only its rows of every batch and the gradient mean spans both. Its checkpoints
must resume in one process and the reverse. Float sums over devices are reduced in another
order across processes, so parameters agree to ATOL, not bit for bit (measured: about 1e-7).
"""

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from builders import make_model
from subprocesses import ROOT, command_env

from lstm_jax import distributed
from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.errors import UsageError, UserError
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


def _local_sh(workdir, text_path, num_steps: int, **env: str) -> subprocess.Popen:
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
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # One process group: local.sh and its processes, to kill at once.
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


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of TCP sockets listening on `port`, read from /proc/net/tcp{,6}."""
    found = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN.
                continue
            raw = bytes.fromhex(address)  # 32-bit words, each in host byte order.
            if sys.byteorder == "little":
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # [::ffff:127.0.0.1]
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp6").exists(), reason="reads Linux's /proc/net/tcp6")
def test_local_sh_coordinator_listens_on_127_0_0_1_only(small_text_path, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = _local_sh(tmp_path / "run", small_text_path, num_steps=10_000, PORT=str(port))
    try:
        deadline, addresses = time.monotonic() + 120, set()
        while not addresses and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            addresses = _listening_addresses(port)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # The socket is all this test is about.
        _, stderr = process.communicate(timeout=60)
    assert addresses == {"127.0.0.1"}, stderr[-3000:]


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
        ({"coordinator_bind_address": "127.0.0.1"}, "HOST:PORT"),
        ({"coordinator_bind_address": ":8482"}, "HOST:PORT"),
        ({"coordinator_bind_address": "127.0.0.1:65536"}, "1..65535"),
    ],
)
def test_distributed_flags_that_cannot_form_a_job_are_refused(options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        distributed.initialize(distributed.DistributedOptions(**options))


def test_a_bind_address_the_coordinator_cannot_listen_on_is_one_error_not_a_crash(monkeypatch):
    """JAX's coordinator segfaults on these; they are refused before it starts."""
    monkeypatch.setattr(jax.distributed, "initialize", _must_not_be_called)
    job = {"coordinator_address": "127.0.0.1:1", "num_processes": 2}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = f"127.0.0.1:{taken.getsockname()[1]}"
        for process_id, address, message in [
            (0, "192.0.2.1:8482", "Cannot assign requested address"),  # Not this machine's.
            (1, "192.0.2.1:8482", "Cannot assign requested address"),
            (0, in_use, "Address already in use"),
        ]:
            options = distributed.DistributedOptions(
                **job, process_id=process_id, coordinator_bind_address=address
            )
            with pytest.raises(UserError, match=message):
                distributed.initialize(options)


def test_the_bind_address_reaches_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(distributed, "on_cloud_tpu", lambda: True)
    with socket.socket() as s:  # A free port: process 0 checks that it can listen there.
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    job = distributed.DistributedOptions(
        coordinator_address=address, num_processes=2, process_id=0, coordinator_bind_address=address
    )
    assert distributed.initialize(job)
    # On a Cloud TPU VM, with the job detected by JAX (launch/tpu.sh).
    assert distributed.initialize(distributed.DistributedOptions(coordinator_bind_address=address))
    assert distributed.initialize(distributed.DistributedOptions())
    assert [k["coordinator_bind_address"] for _, k in calls] == [address, address, None]


def test_auto_runs_alone_off_a_cloud_tpu(monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", _must_not_be_called)
    assert distributed.initialize(distributed.DistributedOptions("auto")) is False
    assert distributed.initialize(distributed.DistributedOptions("off")) is False


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("jax.distributed.initialize was called")
