"""The run folder a trainer works in: who holds it, whether it can be written, and what it is
told before training starts.

One trainer per workdir: two trainers on one folder would overwrite each other's checkpoints and
metrics. `claim` takes the folder for the duration of a run: it refuses a path that is not a
folder, probes that the folder can be written and has room for a checkpoint, and takes a lock
file (`WORKDIR/trainer.lock`, JSON naming the process, its host and its command). A second
trainer is refused in one line naming the holder. A lock left by a process that died (SIGKILL,
a lost VM) is recognised, on the same host, by the process being gone (or its PID reused by
another process: the lock records the process's start time) and is taken over with a warning.
A lock from another host cannot be checked from here: it is refused, naming the host, and the
message says which file to delete if that run is gone.

Local disks: the lock is created atomically (`O_CREAT | O_EXCL`), so of two trainers started
together exactly one wins. `gs://`: a cloud object has no exclusive create, so the lock is
checked, then written: it catches a second run started later (the common mistake), not two
started within the same second.

In a multi-process job, process 0 alone claims the folder, and every process learns its verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator

import jax
from absl import logging
from etils import epath

from lstm_jax import distributed
from lstm_jax.checkpoint import workdir_path
from lstm_jax.errors import UsageError, UserError, reason

LOCK_FILE = "trainer.lock"


@dataclasses.dataclass(frozen=True)
class Holder:
    """The process that holds a workdir."""

    pid: int
    host: str
    started: str  # The process's start time as the kernel counts it ("" where unknown).
    since: float  # When it took the workdir (seconds since the epoch).
    command: str

    @classmethod
    def this_process(cls) -> Holder:
        pid = os.getpid()
        command = " ".join([os.path.basename(sys.executable), *sys.argv])[:300]
        return cls(pid, socket.gethostname(), _process_start(pid), time.time(), command)

    @classmethod
    def from_json(cls, text: str) -> Holder | None:
        """The holder a lock file names, or None if it is not a whole lock (torn, edited)."""
        try:
            fields = json.loads(text)
            return cls(
                int(fields["pid"]),
                str(fields["host"]),
                str(fields["started"]),
                float(fields["since"]),
                str(fields["command"]),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"

    def is_running(self) -> bool | None:
        """Whether the holder still runs; None when it is on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # It exists, owned by another user.
        return not self.started or _process_start(self.pid) in ("", self.started)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"process {self.pid} on {self.host}, since {since} ({self.command})"


def _process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot (Linux), which tells a PID reused by
    a new process from the one that took the lock; "" where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclasses.dataclass
class Claim:
    """A workdir held by this process until `release`."""

    path: epath.Path
    lock: epath.Path | None  # None on processes other than 0.
    holder: Holder | None
    created: bool  # The folder did not exist before this run.

    def release(self) -> None:
        """Give the folder back: remove the lock if it is still ours; remove the folder if this
        run created it and left nothing in it (a run refused after the claim)."""
        if self.lock is None:
            return
        with contextlib.suppress(OSError):
            if Holder.from_json(self.lock.read_text()) == self.holder:
                self.lock.unlink()
        self.lock = None
        if self.created and not any(self.path.iterdir()):
            with contextlib.suppress(OSError):
                self.path.rmdir()


@contextlib.contextmanager
def claim(workdir: str, *, needed_bytes: int = 0) -> Iterator[Claim]:
    """Hold `workdir` for a run: checked, probed, locked; released when the block ends.

    needed_bytes: the size of one checkpoint; a local disk with less free space is refused.
    A `UserError` (on every process of a job) says why the folder cannot be used.
    """
    held, error = None, None
    if jax.process_index() == 0:
        try:
            held = _claim(workdir, needed_bytes)
        except UserError as e:
            error = e
    if not distributed.agree(error is None):
        if error is not None:
            raise error
        raise UserError(f"Process 0 could not use --workdir={workdir}; its log says why.")
    held = held or Claim(workdir_path(workdir), None, None, created=False)
    try:
        yield held
    finally:
        held.release()


def _claim(workdir: str, needed_bytes: int) -> Claim:
    if not str(workdir).strip():
        raise UsageError("--workdir is empty; name the run folder, e.g. --workdir=runs/mine.")
    path = workdir_path(workdir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir={workdir} is a file, not a folder; name a folder.")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create --workdir={workdir}: {reason(e)}.") from None
    held = Claim(path, path / LOCK_FILE, Holder.this_process(), created)
    try:
        _take_lock(held)
    except BaseException:
        held.lock = None  # Not ours: leave it.
        if created and not any(path.iterdir()):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    try:
        _check_writable(path, needed_bytes)
    except BaseException:
        held.release()
        raise
    return held


def _take_lock(held: Claim) -> None:
    lock, local = held.lock, "://" not in str(held.path)
    for _ in range(3):  # A stale lock is moved aside, then the create is tried again.
        try:
            if local:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(held.holder.to_json())
                return
            if not lock.exists():
                lock.write_text(held.holder.to_json())
                return
        except FileExistsError:
            pass
        except OSError as e:
            raise UserError(f"Cannot write in --workdir={held.path}: {reason(e)}.") from None
        try:
            text = lock.read_text()
        except FileNotFoundError:
            continue  # Released meanwhile.
        except OSError as e:
            raise UserError(f"Cannot read the lock {lock}: {reason(e)}.") from None
        holder = Holder.from_json(text)
        if holder is not None:
            running = holder.is_running()
            if running:
                raise UserError(
                    f"{held.path} is in use by another trainer: {holder.describe()}. Wait for it "
                    "to finish or stop it, or use another --workdir."
                )
            if running is None:
                raise UserError(
                    f"{held.path} is in use by another trainer: {holder.describe()}, which "
                    f"cannot be checked from here. If that run has ended, delete {lock} and "
                    "run again; otherwise use another --workdir."
                )
        what = holder.describe() if holder else "an unreadable lock"
        logging.warning("Taking over %s, left by %s, which is no longer running.", lock, what)
        stale = lock.with_name(f"{LOCK_FILE}.stale")
        with contextlib.suppress(FileNotFoundError):  # Another trainer moved it first.
            lock.rename(stale)
            stale.unlink()
    raise UserError(f"Could not take the lock {lock}: it keeps changing; is a trainer starting?")


def _check_writable(path: epath.Path, needed_bytes: int) -> None:
    """Write, sync and remove a file, so that a folder that cannot be written fails now, not in
    a background save an hour later; and, on a local disk, check there is room for a checkpoint."""
    for folder in (path, path / "checkpoints"):
        if folder.is_dir():
            _probe(folder)
    if "://" not in str(path) and needed_bytes:
        free = shutil.disk_usage(path).free
        if free < needed_bytes:
            raise UserError(
                f"--workdir={path} has {free / 2**20:,.1f} MiB free; one checkpoint of this "
                f"model needs {needed_bytes / 2**20:,.1f} MiB. Free some space or use another "
                "--workdir."
            )


def _probe(folder: epath.Path) -> None:
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        if "://" in str(folder):
            probe.write_text("probe")
        else:
            with open(probe, "w") as f:
                f.write("probe")
                f.flush()
                os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise UserError(f"Cannot write in {folder}: {reason(e)}.") from None
