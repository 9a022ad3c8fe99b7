"""Compressor anchors: the test bpc of general-purpose compressors on the project's own split.

    python experiments/compressors.py [--paq8px=/path/to/paq8px] [--paq8px_levels=8,8L] \\
        [--val_fraction=0.05 --test_fraction=0.1]

Each compressor is given everything before the test part, exactly as the runs split the text
(training + validation: 761,330 characters of the bundled Dracula), and then that text plus the
test part. Its test bpc is

    (size(before + test) - size(before)) * 8 / number of test characters (84,592),

so the compressor has seen what the model trained on, and the archive's fixed overheads cancel.
Both inputs have the same path: zpaq stores the file's name in its archive, one byte a
character, so two names of different lengths would move its bpc (11 characters: 0.001 bpc).
The denominator counts characters, not bytes: the text is not pure ASCII (it has £, accented
letters, an em dash and curly quotes), and it is given to the compressors as UTF-8, so its bytes
outnumber its characters.

The text is the one `DataConfig()`'s defaults load: the bundled Dracula, not lower-cased, 5 %
validation and 10 % test. No experiments/*.flags file changes those, so every run uses this
split; --val_fraction and --test_fraction override the fractions, as in the sibling scripts.

Compressors: xz -9e, bzip2 -9, zpaq -m4 and zpaq -m5, each found on PATH (a missing one is
skipped, and named on stderr), and paq8px at each of --paq8px_levels when --paq8px names its
binary. paq8px was not installed where this script was written: its command line follows
paq8px's own help (`paq8px -LEVEL INPUT` writes INPUT.paq8pxNNN into the current folder), and
is exercised here only with a stand-in binary. Prints the CPU model, then a markdown table, one
row as each compressor finishes, with its wall time (both compressions).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lstm_jax.config import DataConfig, check_ranges

# A level is digits and optional flag letters (8, 8L, 12LA); the dash is added when run.
_PAQ8PX_LEVEL = re.compile(r"-?\d+[A-Za-z]*")


class CompressorError(RuntimeError):
    """A compressor that exited with an error or wrote nothing: the script stops with one line."""


@dataclasses.dataclass(frozen=True)
class Compressor:
    """One compressor at one setting, and how to call it.

    `command` is run with the output folder (empty) as the current folder, and `{input}` in it
    replaced by the input file's absolute path. With `stream`, the input comes on stdin and
    stdout is the compressed text; otherwise the command writes its archive into the current
    folder (zpaq and paq8px). The compressed size is the size of everything in that folder.
    """

    label: str
    command: tuple[str, ...]
    stream: bool = False

    @property
    def program(self) -> str:
        return self.command[0]


def standard_compressors() -> list[Compressor]:
    return [
        Compressor("xz -9e", ("xz", "-9e", "-c"), stream=True),
        Compressor("bzip2 -9", ("bzip2", "-9", "-c"), stream=True),
        Compressor("zpaq -m4", ("zpaq", "a", "archive.zpaq", "{input}", "-m4")),
        Compressor("zpaq -m5", ("zpaq", "a", "archive.zpaq", "{input}", "-m5")),
    ]


def paq8px_compressors(binary: str, levels: Sequence[str]) -> list[Compressor]:
    """paq8px at each level (`8`, `8L`: level 8 with its LSTM model), single-file mode."""
    dashed = [level if level.startswith("-") else f"-{level}" for level in levels]
    return [Compressor(f"paq8px {level}", (binary, level, "{input}")) for level in dashed]


def available(compressors: list[Compressor]) -> tuple[list[Compressor], list[str]]:
    """The compressors whose program is found (on PATH, or as a path), and the missing programs."""
    found, missing = [], []
    for compressor in compressors:
        if shutil.which(compressor.program):
            found.append(compressor)
        elif compressor.program not in missing:
            missing.append(compressor.program)
    return found, missing


def compressed_size(compressor: Compressor, data: bytes, workdir: Path) -> int:
    """Bytes that `compressor` makes of `data`. The input always has the same path inside
    `workdir`, so an archive that stores the file's name stores the same name every time."""
    source, output = workdir / "input" / "text", workdir / "output"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir()
    command = [part.replace("{input}", str(source)) for part in compressor.command]
    with open(source, "rb") as stdin, open(output / "stdout", "wb") as stdout:
        result = subprocess.run(
            command,
            cwd=output,
            stdin=stdin if compressor.stream else subprocess.DEVNULL,
            stdout=stdout if compressor.stream else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    if result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip().splitlines()
        raise CompressorError(
            f"{compressor.label} exited with code {result.returncode}"
            + (f": {said[-1]}" if said else "")
        )
    size = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    if size == 0:
        raise CompressorError(f"{compressor.label} wrote nothing into its output folder")
    return size


def held_out_bpc(compressor: Compressor, before: str, test: str) -> float:
    """Bits per test character that `compressor` spends on `test` once it has seen `before`."""
    with tempfile.TemporaryDirectory(prefix="lstm_jax_compressors_") as workdir:
        alone = compressed_size(compressor, before.encode("utf-8"), Path(workdir))
        joined = compressed_size(compressor, (before + test).encode("utf-8"), Path(workdir))
    return (joined - alone) * 8 / len(test)


def cpu_model() -> str:
    """The `model name` line of /proc/cpuinfo (the platform's processor where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def split_texts(val_fraction: float | None, test_fraction: float | None) -> tuple[str, str, str]:
    """(everything before the test part, the test part, the corpus note), as text."""
    overrides = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    config = DataConfig(**{k: v for k, v in overrides.items() if v is not None})
    check_ranges(config)  # Raises UsageError, a ValueError: each fraction within (0, 1).
    if config.val_fraction + config.test_fraction >= 1:
        raise ValueError("--val_fraction plus --test_fraction must leave some text for training")
    if config.test_fraction == 0:
        raise ValueError("--test_fraction=0 leaves no test part")
    from lstm_jax.data import load_split  # Brings JAX: --help and bad flags answer without it.

    vocab, split, note = load_split(config)
    # One document (Dracula): its split is contiguous, train then val then test.
    return vocab.decode(np.concatenate([split.train, split.val])), vocab.decode(split.test), note


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--paq8px",
        default="",
        metavar="PATH",
        help="paq8px binary to run too (default: none, not installed).",
    )
    parser.add_argument(
        "--paq8px_levels",
        default="8,8L",
        metavar="LEVELS",
        help="Comma-separated paq8px levels with flags (default 8,8L: -8 and -8 with its LSTM).",
    )
    parser.add_argument(
        "--val_fraction", type=float, metavar="F", help="Default: DataConfig's 0.05."
    )
    parser.add_argument(
        "--test_fraction", type=float, metavar="F", help="Default: DataConfig's 0.1."
    )
    return parser.parse_args(argv)


def chosen_compressors(args: argparse.Namespace) -> list[Compressor]:
    """The standard compressors plus paq8px's levels; a bad --paq8px raises ValueError."""
    compressors = standard_compressors()
    if args.paq8px:
        binary = Path(args.paq8px).expanduser()
        if not binary.is_file():
            raise ValueError(f"--paq8px={args.paq8px}: no such file")
        if not shutil.which(str(binary.resolve())):
            raise ValueError(f"--paq8px={args.paq8px}: not executable")
        levels = [level.strip() for level in args.paq8px_levels.split(",") if level.strip()]
        bad = [level for level in levels if not _PAQ8PX_LEVEL.fullmatch(level)]
        if bad or not levels:
            raise ValueError(
                f"--paq8px_levels={args.paq8px_levels}: want levels like 8,8L (digits, then flags)"
            )
        compressors += paq8px_compressors(str(binary.resolve()), levels)
    return compressors


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        compressors, missing = available(chosen_compressors(args))
        before, test, note = split_texts(args.val_fraction, args.test_fraction)
    except ValueError as error:  # Bad flags, and DataConfig's range checks (UserError).
        print(f"error: {error}", file=sys.stderr)
        return 2
    if missing:
        print(f"skipped (not on PATH): {', '.join(missing)}", file=sys.stderr)
    print(f"CPU: {cpu_model()}")
    print(
        f"{note}; before the test part {len(before):,} characters "
        f"({len(before.encode('utf-8')):,} bytes as UTF-8), test {len(test):,} characters "
        f"({len(test.encode('utf-8')):,} bytes)\n"
    )
    print("| compressor | test bpc | time |\n|---|---:|---:|", flush=True)
    for compressor in compressors:
        started = time.perf_counter()
        try:
            bpc = held_out_bpc(compressor, before, test)
        except (CompressorError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - started
        print(f"| {compressor.label} | {bpc:.4f} | {seconds:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
