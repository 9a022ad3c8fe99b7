"""Reading a run's metrics.jsonl back (for `report` and `info`): its records, line by line.

The file is written by `lstm_jax.metrics.MetricsFile`, but it can be damaged: a run killed
mid-write tears its last line, and a file copied, merged or edited by hand can hold anything.
Each line that is not a usable record (not UTF-8, not JSON, not a JSON object, no integer
"step", text where a number belongs) is skipped with one warning naming `file:line` and why;
the good lines are read all the same. No JAX here: reading runs while they train stays fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from absl import logging

from lstm_jax.errors import UserError

# The fields the readers compute with, by the kind of value they must hold; the others pass as
# they are. Losses may be NaN or infinite (a diverged run logs them); counts and clocks may not.
INTEGERS = ("step", "parameters", "chars_per_step")
FINITE = ("time", "wall_seconds", "train_seconds")
NUMBERS = ("train_loss", "val_loss", "val_bpc", "ema_val_bpc", "test_loss", "test_bpc")
TEXTS = ("cell", "test_of")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every usable record of the metrics file at `path` (a pathlib or epath Path, so gs://
    too), in file order; blank lines are skipped silently, other unusable ones with a warning.
    A `UserError` if the file cannot be read, or has lines and not one of them is usable."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}).") from None
    records, unusable = [], 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        record, why = _parse(raw)
        if record is None:
            torn = " (cut short: the run was killed writing it?)" if number == len(lines) else ""
            logging.warning("%s:%d: skipped, %s%s.", path, number, why, torn)
            unusable += 1
        else:
            records.append(record)
    if unusable and not records:
        raise UserError(
            f"No line of {path} is a metrics record ({unusable} unreadable, see the warnings): "
            "is it the metrics.jsonl of a training run?"
        )
    return records


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the record, "") or (None, why the line is not one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start})"
    try:
        record = json.loads(text)
    except ValueError:
        return None, f"not JSON: {text[:60]!r}"
    except RecursionError:  # '[[[[...' thousands deep: valid JSON, but no record.
        return None, "JSON nested too deep"
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}: {text[:60]!r}"
    if "step" not in record:
        return None, 'no "step"'
    for name, value in record.items():
        if not _fits(name, value):
            return None, f'"{name}" is {value!r:.40}, not {_kind(name)}'
    return record, ""


def _fits(name: str, value: Any) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if name in INTEGERS:
        return isinstance(value, int) and not isinstance(value, bool)
    if name in FINITE:
        return number and math.isfinite(value)
    if name in NUMBERS:
        return number
    return name not in TEXTS or isinstance(value, str)


def _kind(name: str) -> str:
    if name in INTEGERS:
        return "an integer"
    return "a finite number" if name in FINITE else "a number" if name in NUMBERS else "text"
