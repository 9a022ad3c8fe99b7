"""Stopping a run cleanly: SIGTERM or Ctrl-C ends it after the step in flight, with a save.

A preempted VM gets SIGTERM; a user presses Ctrl-C. Either way the loop finishes its step,
evaluates, saves, and exits 0, and the same command resumes. In a multi-process job the
processes agree on the step to stop after through JAX's preemption sync point.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopSignal:
    """Turns SIGTERM/SIGINT into a request to stop after the step in flight (and save).

    A multi-process job must stop every process after the same step, or the next collective
    hangs. There the signals are left to JAX's preemption notifier (installed by
    `jax.distributed.initialize`; SIGTERM to any process) and `requested_at` asks it, every
    step, whether all processes have agreed on this step as the one to stop after.
    """

    def __init__(self):
        self.requested: str | None = None
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
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C stops at once.
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
