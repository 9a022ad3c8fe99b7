"""`python -m lstm_jax.X` for the tests, forked from a Python that has already imported JAX.

Each command a test starts would spend about 2 s importing JAX, Flax, Optax and Orbax before it
reads its first flag (ml_dtypes alone takes 0.6 s); the suite starts some hundreds. This file, run
as a script, is a fork server: it imports those libraries once (never lstm_jax, which every
command imports afresh, so its flags and module state are new each time), then forks one child
per request. A request (a JSON line on a Unix socket) carries the module, its arguments, the
working directory and environment, and the command's stdin, stdout and stderr as file
descriptors (SCM_RIGHTS). The child puts them on 0, 1 and 2 and runs the module as `python -m`
does: runpy, with sys.path[0] the working directory, and exits as the interpreter does (atexit
handlers, a traceback and status 1 for an uncaught exception, death by SIGINT for an uncaught
KeyboardInterrupt). The server answers the child's pid at once and its exit status (as
`Popen.returncode` gives it: negative for a signal) when it ends.

What the interpreter and JAX read from the environment at start-up (PYTHON*, JAX_*, XLA_*) was
fixed when the server started: `Client.can_run` says whether a command's environment agrees with
the server's there; tests/subprocesses.py starts a real subprocess for any that does not.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

STARTUP_PREFIXES = ("PYTHON", "JAX_", "XLA_", "LD_", "OMP_", "OPENBLAS_", "MKL_")
PER_COMMAND = ("PYTHONUNBUFFERED",)  # Applied in the child: it reopens nothing, it reconfigures.


def startup_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES) and k not in PER_COMMAND}


# --- The server ---------------------------------------------------------------------------------


def _serve(path: str) -> dict | None:
    """Accept requests until the parent goes; returns the request in a child, None in the server."""
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under another name and renamed once listening: the client waits for `path` to exist,
    # and a connect between bind and listen is refused (seen once in a suite run).
    listener.bind(path + ".binding")
    listener.listen(64)
    os.rename(path + ".binding", path)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while os.getppid() == parent:
        readable, _, _ = select.select([listener], [], [], 0.02)
        if readable:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in waiting.values():
                    other.close()
                connection.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                return request
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = waiting.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass  # The test has gone; nobody waits for this status.
                connection.close()
    return None


def _become(request: dict) -> str:
    """The child: the command's directory, environment and argv; returns the module to run."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["env"].get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True)
    sys.argv = [request["module"], *request["args"]]
    sys.path[0] = request["cwd"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return request["module"]


def main() -> None:
    import absl.app  # noqa: F401  # What every command imports before its first flag.
    import flax.linen  # noqa: F401
    import jax  # noqa: F401
    import numpy  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401

    request = _serve(sys.argv[1])
    if request is None:
        return
    runpy.run_module(_become(request), run_name="__main__", alter_sys=True)


# --- The client (in the test process) -----------------------------------------------------------


class Forked:
    """The part of subprocess.Popen that tests use, for a child of the fork server."""

    def __init__(self, connection: socket.socket, pid: int, answer: bytes, stdout, stderr) -> None:
        self._connection = connection
        self._answer = answer  # What came after the pid: the start of the status, if any.
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def _read_status(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._answer.endswith(b"\n"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                return
            chunk = self._connection.recv(64)
            if not chunk:
                raise RuntimeError(f"the fork server went away while child {self.pid} ran")
            self._answer += chunk
        self.returncode = int(self._answer)
        self._connection.close()

    def poll(self) -> int | None:
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read_status(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"child {self.pid}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Client:
    """One fork server per test process, started on first use with the environment `env`."""

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self._env = env
        self._cwd = cwd
        self._path = os.path.join(tempfile.mkdtemp(prefix="lstm_jax_fork_"), "socket")
        self._server: subprocess.Popen | None = None

    def can_run(self, env: dict[str, str]) -> bool:
        return startup_environment(env) == startup_environment(self._env)

    def _start(self) -> None:
        if self._server is not None and self._server.poll() is None:
            return
        if os.path.exists(self._path):
            os.unlink(self._path)
        self._server = subprocess.Popen(
            [sys.executable, __file__, self._path],
            cwd=self._cwd,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not os.path.exists(self._path):
            if self._server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the fork server for test commands did not start")
            time.sleep(0.02)

    def start(
        self, module: str, args: list[str], cwd: str, env: dict[str, str], fds, stdout, stderr
    ) -> Forked:
        """Fork `python -m module args` with stdin, stdout, stderr on `fds` (the caller closes
        them); `stdout` and `stderr` are what the returned process offers as its own."""
        self._start()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(self._path)
        message = json.dumps({"module": module, "args": args, "cwd": cwd, "env": env})
        socket.send_fds(connection, [message.encode()], list(fds))
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = connection.recv(64)
            if not chunk:
                raise RuntimeError("the fork server closed the connection before forking")
            answer += chunk
        pid, rest = answer.split(b"\n", 1)
        return Forked(connection, int(pid), rest, stdout, stderr)

    def close(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.kill()
            self._server.wait()


if __name__ == "__main__":
    main()
