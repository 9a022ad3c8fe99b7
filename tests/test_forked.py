"""tests/forked.py: a command forked from the pre-imported Python behaves as a fresh `python -m`."""

import signal
import subprocess
import sys

import subprocesses
from subprocesses import ROOT, command_env


def _both(*args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    argv = [sys.executable, "-m", *args]
    env = command_env()
    fresh = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    forked = subprocesses.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return fresh, forked


def test_a_refusal_and_help_are_what_a_fresh_process_gives(tmp_path):
    fresh, forked = _both("lstm_jax.main", "--hidden=-3", f"--workdir={tmp_path / 'run'}")
    assert forked.returncode == fresh.returncode == 2
    assert forked.stderr == fresh.stderr and "--hidden must be > 0" in forked.stderr
    fresh, forked = _both("lstm_jax.sample", "--help")
    assert forked.returncode == fresh.returncode  # (absl's --help exits 1.)
    assert forked.stdout == fresh.stdout and "--temperature" in forked.stdout
    server = subprocesses._fork_server
    assert server is not None and server._server.poll() is None  # It ran them: it is up.


def test_an_uncaught_error_and_a_signal_end_it_as_they_end_python():
    fresh, forked = _both("lstm_jax.no_such_module")
    assert forked.returncode == fresh.returncode == 1
    assert "No module named lstm_jax.no_such_module" in forked.stderr
    process = subprocesses.popen(
        [sys.executable, "-m", "lstm_jax.main", "--helpfull"],
        cwd=ROOT, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    process.stderr.close()


def test_an_environment_python_or_jax_reads_at_start_gets_a_fresh_process():
    server = subprocesses._forkable([sys.executable, "-m", "x"], command_env())
    assert server is not None and server.can_run(command_env() | {"LSTM_JAX_X": "1"})
    assert not server.can_run(command_env() | {"JAX_ENABLE_X64": "1"})
    assert not server.can_run(command_env() | {"PYTHONPATH": "/elsewhere"})
    assert subprocesses._forkable([sys.executable, "-c", "pass"], command_env()) is None
