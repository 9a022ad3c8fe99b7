"""A file that a flag names, read as text: every check a text file passes before it is used.

One reader for all of them (`--data_path`'s files, `evaluate --text`, `sample --prompt_file`):
a regular file only (a FIFO, a device or a socket is refused before it is opened, so nothing
hangs or reads forever), under a size cap checked from `os.stat` before reading, a UTF-8 BOM
dropped, a UTF-16 or UTF-32 BOM named with the `--encoding` to pass, and a file that decodes
but looks binary (NUL characters, many control characters) refused. Every refusal is one
`UserError` line naming the flag and the file.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from lstm_jax.config import DataConfig
from lstm_jax.errors import UserError

MAX_TEXT_MB = DataConfig().max_text_mb  # The cap of files read by commands without the flag.
MB = 1 << 20
# Checked before the UTF-16 ones: the UTF-32-LE mark begins with the UTF-16-LE one.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32", "little-endian"),
    (codecs.BOM_UTF32_BE, "utf-32", "big-endian"),
    (codecs.BOM_UTF16_LE, "utf-16", "little-endian"),
    (codecs.BOM_UTF16_BE, "utf-16", "big-endian"),
)
# Control characters (Unicode category Cc) that text does not hold in bulk: all but tab, line
# feed, form feed and carriage return. A share above BINARY_CONTROL_SHARE of the first
# SNIFF_CHARS characters means binary data (random bytes read as latin-1 give about 24%).
_CONTROLS = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n\f\r"]
_DELETE_CONTROLS = str.maketrans("", "", "".join(_CONTROLS))
BINARY_CONTROL_SHARE = 0.1
SNIFF_CHARS = 1 << 20  # A prefix, so that a huge text is not scanned twice.
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file_size(path: str | os.PathLike, flag: str) -> int:
    """The size in bytes of the regular file `path`; anything else is a `UserError`.

    Uses `os.stat` only: a FIFO would block `open` until a writer came, and a device such as
    /dev/zero would read forever.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"--{flag}={path} does not exist; give an existing text file.") from None
    except OSError as e:
        raise UserError(f"--{flag}={path} cannot be read: {e.strerror or e}.") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
        raise UserError(f"--{flag}={path} is {kind}, not a regular file; give a text file.")
    return info.st_size


def check_text_files(
    paths: Sequence[Path], flag: str, max_mb: float, *, data_flags: bool = False
) -> None:
    """Refuse at once, before anything is read, any of `paths` that is not a regular file and
    files above `max_mb` megabytes (2**20 bytes) together.

    data_flags: the command has --max_text_mb (training), so the message says to raise it.
    """
    sizes = [regular_file_size(path, flag) for path in paths]
    if sum(sizes) <= max_mb * MB:
        return
    if len(paths) == 1:
        what = f"--{flag}={paths[0]} is {_megabytes(sizes[0])}"
    else:
        what = f"The {len(paths)} files of --{flag} hold {_megabytes(sum(sizes))} together"
    if data_flags:
        raise UserError(
            f"{what}, above --max_text_mb={max_mb:g}; raise --max_text_mb if the machine has "
            "memory for several times that, or give less text."
        )
    raise UserError(f"{what}, above the {max_mb:g} MB read as text; give a smaller file.")


def read_text_file(
    path: str | os.PathLike,
    flag: str,
    *,
    encoding: str = "utf-8",
    max_mb: float = MAX_TEXT_MB,
    data_flags: bool = False,
    allow_empty: bool = False,
) -> str:
    """The text of the file `path` that `--flag` names, checked as text (see the module).

    data_flags: the command has --encoding and --max_text_mb (training), so messages name them;
    without, the text must be UTF-8 and the messages say to save it so.
    allow_empty: return "" for an empty (or blank) file instead of refusing it.
    """
    path = Path(path).expanduser()
    name = f"--{flag}={path}"
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"Unknown --encoding={encoding!r}; try utf-8 or latin-1.") from None
    check_text_files([path], flag, max_mb, data_flags=data_flags)
    try:
        raw = path.read_bytes()
    except OSError as e:  # Permission denied, a broken disk, ...
        raise UserError(f"{name} cannot be read: {e.strerror or e}.") from None
    _check_byte_order_mark(raw, codec, name, data_flags)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        todo = (
            "pass --encoding=latin-1 (or the file's real encoding)"
            if data_flags
            else "save it as UTF-8"
        )
        label = "UTF-8" if codec == "utf-8" else encoding
        raise UserError(
            f"{name} is not {label} text: byte {e.object[e.start]:#04x} at offset {e.start}; "
            f"{todo}."
        ) from None
    text = text.removeprefix("\ufeff")  # A byte-order mark is no character of the text.
    if not text.strip():
        if allow_empty:
            return ""
        raise UserError(f"{name} is empty; give a file with text in it.")
    _check_looks_like_text(text, name, data_flags)
    return text


def _check_byte_order_mark(raw: bytes, codec: str, name: str, data_flags: bool) -> None:
    """A UTF-16 or UTF-32 byte-order mark read with another encoding: say which to pass (such
    text read as UTF-8 fails to decode, or decodes to NUL characters)."""
    for mark, family, order in BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            if codec.startswith(family):
                return
            todo = f"pass --encoding={family}" if data_flags else "save it as UTF-8"
            raise UserError(
                f"{name} starts with a {family.upper()} ({order}) byte-order mark: it is "
                f"{family.upper()} text; {todo}."
            )


def _check_looks_like_text(text: str, name: str, data_flags: bool) -> None:
    """Refuse text that is binary data: NUL characters anywhere, or a large share of control
    characters near the start. A model trained on it learns nothing worth having (a file of
    NULs trains to 0 bits per character)."""
    todo = "give a text file" + (
        " (UTF-16 or UTF-32 text without a byte-order mark: pass --encoding=utf-16-le or the "
        "like)"
        if data_flags
        else ""
    )
    if "\x00" in text:
        raise UserError(f"{name} looks binary, not text (it holds NUL characters); {todo}.")
    sample = text[:SNIFF_CHARS]
    controls = len(sample) - len(sample.translate(_DELETE_CONTROLS))
    if controls > BINARY_CONTROL_SHARE * len(sample):
        raise UserError(
            f"{name} looks binary, not text ({controls / len(sample):.0%} of its first "
            f"{len(sample):,} characters are control characters); {todo}."
        )


def _megabytes(size: int) -> str:
    return f"{size / MB:,.1f} MB"
