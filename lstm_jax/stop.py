"""Stopping a run cleanly: SIGTERM or Ctrl-C ends it after the step in flight, with a save.

A preempted VM gets SIGTERM; a user presses Ctrl-C. Either way the loop finishes its step,
evaluates, saves, and exits 0, and the same command resumes. A second Ctrl-C ends the process
at once (exit 130), with one line naming the checkpoint the next run resumes from. In a
multi-process job the processes agree on the step to stop after through JAX's preemption sync
point.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

import jax
from jax.experimental import multihost_utils


class StopSignal:
    """Turns SIGTERM/SIGINT into a request to stop after the step in flight (and save).

    A multi-process job must stop every process after the same step, or the next collective
    hangs. There the signals are left to JAX's preemption notifier (installed by
    `jax.distributed.initialize`; SIGTERM to any process) and `requested_at` asks it, every
    step, whether all processes have agreed on this step as the one to stop after.
    """

    def __init__(self, on_second_interrupt: Callable[[], str] = lambda: "Stopped at once."):
        """on_second_interrupt: what a second Ctrl-C does before the process ends at once (it
        returns the line to print: where the next run resumes from)."""
        self.requested: str | None = None
        self._on_second_interrupt = on_second_interrupt
        self._previous = {}
        self._multiprocess = jax.process_count() > 1

    def requested_at(self, step: int) -> str | None:
        if self._multiprocess and multihost_utils.reached_preemption_sync_point(step):
            self.requested = "a preemption notice (SIGTERM)"
        return self.requested

    def __enter__(self):
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # A second Ctrl-C stops at once.
            message = self._on_second_interrupt()
            os.write(sys.stderr.fileno(), f"error: {message}\n".encode())
            os._exit(128 + signal.SIGINT)  # No unwinding: a save in flight is abandoned.
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
