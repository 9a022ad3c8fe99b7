"""Running the real commands in subprocesses, the way a user (or a preempting VM) does."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_env(*, compile_cache: bool = True) -> dict[str, str]:
    """The test process's environment minus the 8 fake devices: one CPU device, like users.

    compile_cache: share the session's persistent compilation cache (see conftest.py); off for
    processes that are killed or run side by side, which could leave or meet half-written entries.
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if compile_cache and "LSTM_JAX_TEST_COMPILE_CACHE" in os.environ:
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ["LSTM_JAX_TEST_COMPILE_CACHE"]
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_module(*args: str, compile_cache: bool = True) -> subprocess.Popen:
    """Start a command whose stderr (where progress goes) is read line by line."""
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**command_env(compile_cache=compile_cache), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
