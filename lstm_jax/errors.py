"""Errors a user can fix. The command line prints them as one line, without a traceback."""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """Bad input (a file, a prompt, a workdir): exit code 1, message says what to do."""

    exit_code = 1


class UsageError(UserError):
    """Impossible flags: exit code 2, like absl's own flag errors."""

    exit_code = 2


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
