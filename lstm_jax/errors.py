"""Errors a user can fix, and how they name what the user passed. The command line prints them
as one line, without a traceback; from Python (`lstm_jax.load`, `lstm_jax.export.export_model`)
they are `ValueError`s.

A message names a setting with `argument("length")`: `--length` on the command line, `length`
inside `python_arguments()` (what the Python API runs under), so one check serves both.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
from collections.abc import Iterator
from typing import Any

_FROM_PYTHON = contextvars.ContextVar("lstm_jax_from_python", default=False)
_NO_VALUE = object()


class UserError(ValueError):
    """Bad input (a file, a prompt, a workdir): exit code 1, message says what to do."""

    exit_code = 1


class UsageError(UserError):
    """Impossible flags: exit code 2, like absl's own flag errors."""

    exit_code = 2


class NoCheckpoint(UserError):
    """A run folder with no whole checkpoint step (yet): train first."""


@contextlib.contextmanager
def python_arguments() -> Iterator[None]:
    """Within the block, `argument` spells settings as Python arguments (`length=0`), not flags."""
    token = _FROM_PYTHON.set(True)
    try:
        yield
    finally:
        _FROM_PYTHON.reset(token)


def argument(name: str, value: Any = _NO_VALUE, *, flag: str | None = None) -> str:
    """A setting as the user passed it: `--flag` / `--flag=value` on the command line (`flag`:
    the flag's name where it differs from the field's; a boolean flag set is `--flag`), `name`
    / `name=value!r` from Python."""
    if _FROM_PYTHON.get():
        return name if value is _NO_VALUE else f"{name}={value!r}"
    shown = f"--{flag or name}"
    return shown if value is _NO_VALUE or value is True else f"{shown}={value}"


def reason(error: BaseException) -> str:
    """What went wrong at the file-system level, in a few words ("No space left on device"),
    from an `OSError` or the text of a wrapped one (Orbax and tensorstore re-raise them)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        match = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(seen))
        if match:
            return os.strerror(int(match.group(1) or match.group(2)))
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    for code in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS):
        if os.strerror(code).lower() in text.lower():
            return os.strerror(code)
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
