"""Run metrics as JSON lines in the workdir (`metrics.jsonl`), one object per event.

Written by process 0 only; appended, so a resumed run continues the same file. On `gs://` the
file is rewritten whole instead, since a cloud object cannot be appended to.

With `tensorboard_dir`, the numbers also go to TensorBoard event files there, through
tensorboardX (no TensorFlow), an optional extra: `pip install 'lstm_jax[tensorboard]'`. Without
it the JSON lines are written all the same.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging
from etils import epath


class MetricsFile:
    def __init__(
        self, path: str | os.PathLike, *, tensorboard_dir: str | os.PathLike | None = None
    ):
        self.path = epath.Path(path)
        self._appendable = "://" not in str(path)
        self._enabled = jax.process_index() == 0
        self._tensorboard = None
        if self._enabled and tensorboard_dir is not None:
            self._tensorboard = TensorBoardWriter.open(tensorboard_dir)

    def write(self, **values: float | str) -> None:
        if not self._enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), **values}
        line = json.dumps(record) + "\n"
        if self._appendable:
            with self.path.open("a") as f:
                f.write(line)
        else:  # One write per logging interval; the file stays small (kB per thousand steps).
            before = self.path.read_text() if self.path.exists() else ""
            self.path.write_text(before + line)
        if self._tensorboard is not None:
            self._tensorboard.write(record)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


class TensorBoardWriter:
    """Every number of a metrics record as a TensorBoard scalar, tagged with its JSON key."""

    def __init__(self, writer):
        self._writer = writer

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
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self._writer.add_scalar(key, value, record["step"], walltime=record["time"])
        self._writer.flush()  # Once per logging interval: a killed run keeps its curves.

    def close(self) -> None:
        self._writer.close()
