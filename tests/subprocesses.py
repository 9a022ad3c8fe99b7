"""Running the real commands in subprocesses, the way a user (or a preempting VM) does."""

import atexit
import os
import subprocess
import sys
import threading
from pathlib import Path

import forked

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


_fork_server: forked.Client | None = None


def _forkable(argv: list[str], env: dict[str, str]) -> forked.Client | None:
    """The fork server (tests/forked.py) for `python -m ...` with an environment it can give."""
    global _fork_server
    if os.environ.get("LSTM_JAX_TEST_NO_FORK") or argv[:2] != [sys.executable, "-m"]:
        return None
    if _fork_server is None:
        _fork_server = forked.Client(command_env(), str(ROOT))
        atexit.register(_fork_server.close)
    return _fork_server if _fork_server.can_run(env) else None


def _fd(target, default: int, opened: list[int]) -> int:
    """The descriptor a Popen-style stdin/stdout/stderr argument names (PIPE is handled apart)."""
    if target is None:
        return default
    if target == subprocess.DEVNULL:
        opened.append(os.open(os.devnull, os.O_RDWR))
        return opened[-1]
    return target if isinstance(target, int) else target.fileno()


def popen(argv: list[str], *, cwd, env, stdin=None, stdout=None, stderr=None, text=False):
    """subprocess.Popen, through the fork server for `python -m` commands it can run: the same
    process for the test (pid, poll, wait, send_signal, kill, a stdout/stderr PIPE to read)."""
    server = _forkable(list(argv), env)
    if server is None or stdin == subprocess.PIPE:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr, text=text
        )
    opened: list[int] = []
    ends = {}
    fds = [_fd(stdin, 0, opened)]
    for name, target, default in (("stdout", stdout, 1), ("stderr", stderr, 2)):
        if target == subprocess.PIPE:
            read, write = os.pipe()
            opened.append(write)
            ends[name] = open(read, "r" if text else "rb", closefd=True)  # noqa: SIM115
            fds.append(write)
        elif target == subprocess.STDOUT:
            fds.append(fds[1])
        else:
            fds.append(_fd(target, default, opened))
    try:
        module, *args = argv[2:]
        return server.start(
            module, args, str(cwd), dict(env), fds, ends.get("stdout"), ends.get("stderr")
        )
    finally:
        for fd in opened:
            os.close(fd)


def run(argv: list[str], *, cwd, env, capture_output=False, text=False, timeout=None, **kwargs):
    """subprocess.run, through the fork server where `popen` can use it."""
    if kwargs or _forkable(list(argv), env) is None:
        return subprocess.run(
            argv, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
            **kwargs,
        )  # fmt: skip
    pipe = subprocess.PIPE if capture_output else None
    process = popen(argv, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=text)
    outputs: dict[str, object] = {}
    readers = [
        threading.Thread(target=lambda n=name, f=stream: outputs.__setitem__(n, f.read()))
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
        if stream is not None
    ]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        for reader in readers:
            reader.join()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    return subprocess.CompletedProcess(
        argv, process.returncode, outputs.get("stdout"), outputs.get("stderr")
    )


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_module(*args: str, compile_cache: bool = True) -> subprocess.Popen:
    """Start a command whose stderr (where progress goes) is read line by line. Forked (with the
    compile cache), it offers what tests use of Popen: pid, poll, wait, send_signal, kill,
    terminate, stderr; not communicate (a killed trainer, compile_cache=False, is a Popen)."""
    return popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**command_env(compile_cache=compile_cache), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
