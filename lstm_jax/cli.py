"""Command-line flags generated from the settings dataclasses, and how commands run.

A command names the settings dataclasses it reads (`Config` for training, a sampling options
class for `sample`, ...); `run` defines one absl flag per field (name, type, default, help and
choices all come from the field), so each command has exactly its own flags: a flag it does
not read is refused by absl as unknown. `--help` lists them grouped by section, with defaults.
Experiments are absl flagfiles: `python -m lstm_jax.main --flagfile=experiments/x.flags`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging as pylogging
import os
import signal
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from lstm_jax.config import field_types, is_section, leaf_fields, leaf_settings
from lstm_jax.errors import UsageError, UserError
from lstm_jax.settings import check_ranges, flag_name
from lstm_jax.textfile import read_text_file

FLAGS = flags.FLAGS


def define_flags(spec: type, flag_values: flags.FlagValues = FLAGS) -> None:
    """One absl flag per setting of `spec` (a settings dataclass, sections included)."""
    defaults = spec()
    for path, field, kind in leaf_fields(spec):
        default = defaults
        for name in (*path, field.name):
            default = getattr(default, name)
        group = f"lstm_jax {path[0] if path else spec.__name__}"
        options = {"flag_values": flag_values, "module_name": group}
        name, help_text = flag_name(field), field.metadata["help"]
        if field.metadata.get("choices"):
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), help_text, **options)
        elif kind is bool:
            flags.DEFINE_bool(name, default, help_text, **options)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_text, **options)
        elif kind is float:
            flags.DEFINE_float(name, default, help_text, **options)
        elif kind is str:
            flags.DEFINE_string(name, default, help_text, **options)
        else:
            raise TypeError(f"{spec.__name__}.{field.name}: no flag type for {kind}")


def read_flags(spec: type, flag_values: flags.FlagValues = FLAGS) -> Any:
    """An instance of `spec` with every setting taken from the parsed flags; a `UsageError` if
    a number is outside its declared range (`settings.check_ranges`), so no command starts
    work on one."""
    settings = _from_flags(spec, flag_values)
    check_ranges(settings)
    return settings


def _from_flags(spec: type, flag_values: flags.FlagValues) -> Any:
    types = field_types(spec)
    values = {}
    for field in dataclasses.fields(spec):
        if is_section(field):
            values[field.name] = _from_flags(types[field.name], flag_values)
        else:
            values[field.name] = flag_values[flag_name(field)].value
    return spec(**values)


def given_settings(spec: type, flag_values: flags.FlagValues = FLAGS) -> set[str]:
    """Names of the settings of `spec` set on the command line or in a flagfile."""
    return {f.name for _, f, _ in leaf_fields(spec) if flag_values[flag_name(f)].present}


def set_flags(settings: Any, flag_values: flags.FlagValues = FLAGS) -> None:
    """Give the flags of a settings dataclass its values (so that `flagfile_text` has them)."""
    for f, value in leaf_settings(settings):
        flag_values[flag_name(f)].value = value


def flagfile_text(spec: type, flag_values: flags.FlagValues = FLAGS) -> str:
    """Every setting of `spec` as a flagfile that reproduces the run even if a default changes."""
    lines = [flag_values[flag_name(f)].serialize() for _, f, _ in leaf_fields(spec)]
    return "\n".join(lines) + "\n"


def grouped_help(specs: Sequence[type]) -> str:
    """The flags of `specs`, one group per section, each with its help and default."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        defaults, types = spec(), field_types(spec)
        for path, field, _ in leaf_fields(spec):
            default = defaults
            for name in (*path, field.name):
                default = getattr(default, name)
            title = _title(path[0], types[path[0]]) if path else _title("", spec)
            help_text = field.metadata["help"]
            if field.metadata.get("choices"):
                help_text += f" One of: {', '.join(field.metadata['choices'])}."
            entry = f"  --{flag_name(field)}: {help_text} (default: {default!r})"
            groups.setdefault(title, []).append(
                textwrap.fill(entry, width=100, subsequent_indent="      ")
            )
    return "\n\n".join(f"{title}:\n" + "\n".join(lines) for title, lines in groups.items())


def _title(name: str, section: type) -> str:
    first_line = (section.__doc__ or "").strip().splitlines()[0].rstrip(".")
    return f"{name}: {first_line}" if name else first_line


def refuse_positional_arguments(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(
            f"Unexpected arguments: {' '.join(argv[1:])}; flags look like --name=value."
        )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` into one line on stderr and its exit code, with no traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


# The exit status of a process that a closed pipe stopped, as the shell reports one killed by
# SIGPIPE (128 + 13): what `yes | head -1` leaves in ${PIPESTATUS[0]}.
READER_GONE_EXIT = 128 + signal.SIGPIPE


def quiet_when_reader_goes(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`main`, stopping quietly when the reader of its output goes away (`... | head -c 100`,
    `less` quit early): at the first write that fails, with no traceback and the shell's
    SIGPIPE status. Python ignores SIGPIPE and raises `BrokenPipeError` at that write instead;
    stdout is pointed at /dev/null before exiting, so the flush at exit cannot fail again
    (Python's "Note on SIGPIPE", in the `signal` module's documentation)."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> None:
        try:
            try:
                main(argv)
            finally:  # Output still buffered fails here, not in the interpreter's last flush.
                sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            try:
                sys.stderr.flush()
            except BrokenPipeError:  # It was stderr's reader (`2>&1 | head`).
                os.dup2(devnull, sys.stderr.fileno())
            sys.exit(READER_GONE_EXIT)

    return wrapped


def run(main: Callable[[list[str]], None], specs: Sequence[type]) -> None:
    """Define the flags of `specs`, parse them (plus --jax_* flags) and run `main`.

    `--help` prints the command's docstring and its own flags, grouped; `--helpfull` adds
    JAX's and absl's. A closed output pipe ends the command quietly (`quiet_when_reader_goes`).
    """
    import jax

    for spec in specs:
        define_flags(spec)
    main_module = sys.modules["__main__"]
    doc = (main_module.__doc__ or "").rstrip() + "\n\n" + grouped_help(specs) + "\n"
    main_module.__doc__ = doc.replace("%", "%%")  # absl formats the docstring with %.
    jax.config.config_with_absl()
    logging.get_absl_logger().addFilter(_quiet_libraries)
    # "Unable to initialize backend 'tpu'" on every CPU or GPU machine is noise, not news.
    pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.WARNING)
    app.run(quiet_when_reader_goes(main))


def _quiet_libraries(record) -> bool:
    """Orbax logs every file it writes at INFO; keep only its warnings and errors. And a failed
    save: Orbax reports it from each of its background threads with a traceback; the loop
    reports it once, as one line that says what failed and which step is safe
    (`checkpoint.SaveFailed`)."""
    if "/orbax/" not in record.pathname:
        return True
    if record.exc_info and record.levelno >= logging.converter.STANDARD_ERROR:
        return False
    return record.levelno >= logging.converter.STANDARD_WARNING


def read_utf8_flag(flag: str, path: str) -> str:
    """The whole text of the UTF-8 file a flag names, checked as text (`textfile.read_text_file`:
    a regular file, under the default --max_text_mb, not binary; "" if blank); every way it can
    fail is a `UserError` naming the flag."""
    return read_text_file(path, flag, allow_empty=True)


def writable_file_flag(flag: str, path: str) -> Path:
    """The file a flag names for output, checked before the work that fills it: a `UserError`
    naming the flag if it is a folder, or its folder is missing or cannot be written to."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"--{flag}={path} is a folder; give the path of a file (in it, say).")
    if not path.parent.is_dir():
        missing = "is not a folder" if path.parent.exists() else "does not exist"
        raise UserError(f"--{flag}={path}: {path.parent} {missing}; create it or give another.")
    try:  # Writing there, not os.access: read-only mounts count, and root passes os.access.
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        message = f"--{flag}={path}: {path.parent} cannot be written ({e.strerror})"
        raise UserError(f"{message}; give a file in a folder of yours.") from None
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a file beside it, then renamed over it), so a
    failure leaves what was there; a `UserError` if it cannot be written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("x", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise UserError(f"{path} could not be written ({e.strerror}).") from None
