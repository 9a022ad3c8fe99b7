"""Running the real commands in subprocesses, the way a user (or a preempting VM) does."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_env() -> dict[str, str]:
    """The test process's environment minus the 8 fake devices: one CPU device, like users."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_module(*args: str) -> subprocess.Popen:
    """Start a command whose stderr (where progress goes) is read line by line."""
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**command_env(), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
