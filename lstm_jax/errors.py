"""Errors a user can fix. The command line prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (a file, a prompt, a workdir): exit code 1, message says what to do."""

    exit_code = 1


class UsageError(UserError):
    """Impossible flags: exit code 2, like absl's own flag errors."""

    exit_code = 2
