"""Run metrics as JSON lines in the workdir (`metrics.jsonl`), one object per event.

Written by process 0 only; appended, so a resumed run continues the same file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax


class MetricsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._enabled = jax.process_index() == 0

    def write(self, **values: float) -> None:
        if not self._enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
