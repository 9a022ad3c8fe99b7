"""Run metrics as JSON lines in the workdir (`metrics.jsonl`), one object per event.

Written by process 0 only; appended, so a resumed run continues the same file. On `gs://` the
file is rewritten whole instead, since a cloud object cannot be appended to. A run killed
mid-write leaves a last line without its "\n"; the run that resumes starts on a fresh line, so
only the torn line is lost (`lstm_jax.records` reads the file back, skipping such lines).

With `tensorboard_dir`, the numbers also go to TensorBoard event files there, through
tensorboardX (no TensorFlow), an optional extra: `pip install 'lstm_jax[tensorboard]'`. Without
it the JSON lines are written all the same. TensorBoard's Text tab also gets the run's settings
(as flags, with the first record) and the samples the loop logs (`write_text`).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
from absl import logging
from etils import epath

from lstm_jax.settings import leaf_settings


class MetricsFile:
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tensorboard_dir: str | os.PathLike | None = None,
        settings: Any = None,
    ):
        """settings: a settings dataclass (the run's `Config`), for TensorBoard only."""
        self.path = epath.Path(path)
        self._appendable = "://" not in str(path)
        self._enabled = jax.process_index() == 0
        self._tensorboard = None
        self._end_checked = False  # Whether the file's last byte was checked (at the first write).
        if self._enabled and tensorboard_dir is not None:
            self._tensorboard = TensorBoardWriter.open(tensorboard_dir)
        if self._tensorboard is not None and settings is not None:
            self._tensorboard.pending_text["settings"] = flag_lines(settings)

    def write(self, **values: float | str) -> None:
        if not self._enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), **values}
        line = json.dumps(record).encode() + b"\n"
        if self._appendable:
            if not self._end_checked:
                self._end_checked = True
                line = self._new_line_if_torn(_last_byte(self.path)) + line
            with self.path.open("ab") as f:
                f.write(line)
        else:  # One write per logging interval; the file stays small (kB per thousand steps).
            before = self.path.read_bytes() if self.path.exists() else b""
            self.path.write_bytes(before + self._new_line_if_torn(before[-1:]) + line)
        if self._tensorboard is not None:
            self._tensorboard.write(record)

    def _new_line_if_torn(self, last_byte: bytes) -> bytes:
        """b"\\n" where the file ends mid-line (a run killed while writing it), else b""."""
        if last_byte in (b"", b"\n"):
            return b""
        logging.warning(
            "%s ends mid-line (a run was killed writing it); this run starts a new line.", self.path
        )
        return b"\n"

    def write_text(self, tag: str, text: str, step: int) -> None:
        """Text for TensorBoard's Text tab (a sample); metrics.jsonl keeps to numbers."""
        if self._enabled and self._tensorboard is not None:
            self._tensorboard.write_text(tag, text, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _last_byte(path: epath.Path) -> bytes:
    """The file's last byte; b"" for an empty or missing file."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return b""
            f.seek(-1, os.SEEK_END)
            return f.read(1)
    except FileNotFoundError:
        return b""


def flag_lines(settings: Any) -> str:
    """A settings dataclass as the flags that give it, one a line."""
    lines = []
    for f, value in leaf_settings(settings):
        name = f.metadata.get("flag") or f.name
        is_bool = isinstance(value, bool)
        lines.append(f"--{'' if value else 'no'}{name}" if is_bool else f"--{name}={value}")
    return "\n".join(lines)


class TensorBoardWriter:
    """Every number of a metrics record as a TensorBoard scalar, tagged with its JSON key; and
    text, each line kept (as a Markdown code block)."""

    def __init__(self, writer):
        self._writer = writer
        self.pending_text: dict[str, str] = {}  # Tag -> text, written at the next record's step.

    @classmethod
    def open(cls, logdir: str | os.PathLike) -> TensorBoardWriter | None:
        """A writer into `logdir`, or None (with a note in the log) if tensorboardX is missing."""
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.info(
                "tensorboardX is not installed, so no TensorBoard events; metrics.jsonl has "
                "the same numbers (pip install 'lstm_jax[tensorboard]' for both)."
            )
            return None
        try:
            return cls(SummaryWriter(str(logdir)))
        except Exception as e:  # noqa: BLE001 - an optional output must not stop a run.
            logging.warning("Not writing TensorBoard events to %s: %s", logdir, e)
            return None

    def write(self, record: dict[str, object]) -> None:
        for tag, text in self.pending_text.items():
            self.write_text(tag, text, record["step"])
        self.pending_text.clear()
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self._writer.add_scalar(key, value, record["step"], walltime=record["time"])
        self._writer.flush()  # Once per logging interval: a killed run keeps its curves.

    def write_text(self, tag: str, text: str, step: int) -> None:
        markdown = "\n".join(f"    {line}" for line in text.split("\n"))  # Kept as it is.
        self._writer.add_text(tag, markdown, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# --- Summaries and timing for the training loop -------------------------------------------


def summarise(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Host-side metric sums of several steps -> means: every `NAME_sum` divided by the total
    `count`, as `NAME`. A step adds a metric with one line: `metrics["NAME_sum"] = ...`."""
    count = sum(float(m["count"]) for m in step_metrics)
    return {
        name.removesuffix("_sum"): sum(float(m[name]) for m in step_metrics) / count
        for name in step_metrics[0]
        if name.endswith("_sum")
    }


def every(step: int, period: int, *, last: bool = False) -> bool:
    """Whether a periodic action runs after `step`: every `period` steps (0: never), and at the
    last step where `last` says so."""
    return last or (period > 0 and step % period == 0)


class Timer:
    """The loop's clocks: wall time of the whole run (resumes summed), and training time,
    which leaves out compiling and side work (evaluation, checkpoints, samples).

    `pause()` / `resume()` bracket side work; `window()` returns the training seconds since the
    last call, for chars/s.
    """

    def __init__(self, earlier_wall_seconds: float = 0.0, earlier_train_seconds: float = 0.0):
        self._start = time.perf_counter()
        self._earlier_wall = earlier_wall_seconds
        self.train_seconds = earlier_train_seconds
        self._window_start = self._start
        self._paused_at: float | None = None
        self._excluded = 0.0

    def wall_seconds(self) -> float:
        """Wall-clock time of the run so far, compiling and evaluating included."""
        return self._earlier_wall + time.perf_counter() - self._start

    def since_start(self) -> float:
        """Wall-clock time since this process started the clock: a resumed run's earlier
        processes left out (the first step's compile time)."""
        return time.perf_counter() - self._start

    def restart_window(self) -> None:
        """Start a new window now, discarding the time since the last one (the compile)."""
        self._window_start, self._excluded = time.perf_counter(), 0.0

    def window(self) -> float:
        """Training seconds since the last window, side work left out; starts the next one."""
        now = time.perf_counter()
        seconds = now - self._window_start - self._excluded
        self.train_seconds += seconds
        self._window_start, self._excluded = now, 0.0
        return seconds

    def pause(self) -> None:
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._excluded += time.perf_counter() - self._paused_at
            self._paused_at = None


def bpc_text(loss_nats: float) -> str:
    """A loss in nats as "X.XXX bpc", or "-" before there is one."""
    return "-" if math.isnan(loss_nats) else f"{loss_nats / math.log(2):.3f} bpc"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
