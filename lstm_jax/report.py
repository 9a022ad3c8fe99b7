"""Compare runs at a glance: a table of their results and their validation curves.

    python -m lstm_jax.report runs/cells/lstm runs/cells/gru ... [--out=curves.png]

Reads only each workdir's `metrics.jsonl` (no JAX, no checkpoints), so it also works while the
runs are still training. Prints a Markdown table, one row per run, in the order given:

    run          the workdir's name
    cell         --cell
    parameters   trainable parameters
    steps        the last step logged
    wall time    wall-clock time of the run, compiling and evaluating included, resumes summed
    best val bpc the lowest validation bits per character
    chars/s      training throughput: characters trained / training seconds (compiling,
                 evaluating and checkpointing left out), over the whole run

and writes `--out` (curves.png): validation bpc against steps and against wall time, every run
on the same axes. The plot needs matplotlib, an optional extra: `pip install 'lstm_jax[report]'`.

Resumed runs append to their metrics.jsonl; the records after the checkpoint a run resumed from
were trained again, so the second copy wins, and a `--restart` drops everything before it. A line
that is not a record (torn by a killed run, damaged) is skipped with a warning naming file:line.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

from lstm_jax.errors import UsageError, UserError
from lstm_jax.records import read_metrics

# This command's own flag; lstm_jax.cli holds the training and sampling ones.
_OUT = flags.DEFINE_string(
    "out", "curves.png", "Where to write the PNG of validation curves. Default ./curves.png."
)


@dataclasses.dataclass
class RunSummary:
    """One run's row of the table and its validation curve."""

    name: str
    cell: str | None
    parameters: int | None
    steps: int
    wall_seconds: float | None
    best_val_bpc: float  # NaN before the first evaluation.
    test_bpc: float  # Of the best checkpoint, once the run finished; NaN before.
    chars_per_second: float | None
    # (step, wall seconds or None, val bpc) for every evaluation, in step order.
    val_curve: list[tuple[int, float | None, float]]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of the run as it stands: those a resume or `--restart` superseded dropped.
    Unreadable lines are skipped with a warning (`lstm_jax.records`)."""
    records: list[dict[str, Any]] = []
    for record in read_metrics(path):
        if "parameters" in record:  # The run (re)started from this step: what came later goes.
            start = record["step"]
            records = [
                r
                for r in records
                if r["step"] < start or (r["step"] == start and "parameters" not in r)
            ]
        records.append(record)
    return records


def summarize(workdir: str | Path, name: str | None = None) -> RunSummary:
    """Read `workdir/metrics.jsonl` into a `RunSummary`; a `UserError` if there is none."""
    path = Path(workdir).expanduser() / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"No metrics.jsonl in {workdir}: is it a training run's --workdir?")
    records = read_records(path)
    starts = [r for r in records if "parameters" in r]
    start = starts[-1] if starts else {}
    # The last record of each step wins (a resumed run logs its steps again).
    train = {r["step"]: r for r in records if "train_loss" in r}
    val = {r["step"]: r for r in records if "val_bpc" in r}
    timed = [r for r in records if "wall_seconds" in r]
    chars_per_second = None
    if train and start.get("chars_per_step"):
        last = train[max(train)]
        if last.get("train_seconds"):
            chars_per_second = last["step"] * start["chars_per_step"] / last["train_seconds"]
    # The checkpoint's model at each evaluation: the parameters, or their average if better.
    val_curve = [
        (step, r.get("wall_seconds"), min(r["val_bpc"], r.get("ema_val_bpc", math.inf)))
        for step, r in sorted(val.items())
    ]
    tests = [r["test_bpc"] for r in records if "test_bpc" in r]
    return RunSummary(
        name=name or Path(workdir).name,
        cell=start.get("cell"),
        parameters=start.get("parameters"),
        steps=max((r.get("step", 0) for r in records), default=0),
        wall_seconds=timed[-1]["wall_seconds"] if timed else None,
        best_val_bpc=min((bpc for _, _, bpc in val_curve), default=math.nan),
        test_bpc=tests[-1] if tests else math.nan,
        chars_per_second=chars_per_second,
        val_curve=val_curve,
    )


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_table(runs: Sequence[RunSummary]) -> str:
    """The runs as a Markdown table (paste it into a README as it is)."""
    header = ["run", "cell", "parameters", "steps", "wall time", "best val bpc", "test bpc"]
    header.append("chars/s")
    rows = [
        [
            run.name,
            run.cell or "-",
            "-" if run.parameters is None else f"{run.parameters:,}",
            str(run.steps),
            "-" if run.wall_seconds is None else format_duration(run.wall_seconds),
            "-" if math.isnan(run.best_val_bpc) else f"{run.best_val_bpc:.4f}",
            "-" if math.isnan(run.test_bpc) else f"{run.test_bpc:.4f}",
            "-" if run.chars_per_second is None else f"{run.chars_per_second:,.0f}",
        ]
        for run in runs
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(runs: Sequence[RunSummary], path: str | Path) -> None:
    """Validation bpc against steps (left) and wall time (right), as a PNG at `path`."""
    try:
        from matplotlib.figure import Figure  # No pyplot: no GUI backend, no global state.
    except ImportError:
        raise UserError(
            "Writing the curves needs matplotlib: pip install 'lstm_jax[report]'."
        ) from None
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    for run in runs:
        label = f"{run.name} ({run.cell})" if run.cell and run.cell not in run.name else run.name
        steps = [step for step, _, _ in run.val_curve]
        by_step.plot(steps, [bpc for _, _, bpc in run.val_curve], marker=".", label=label)
        timed = [(seconds, bpc) for _, seconds, bpc in run.val_curve if seconds is not None]
        by_time.plot([s / 60 for s, _ in timed], [b for _, b in timed], marker=".", label=label)
    by_step.set(xlabel="step", ylabel="validation bits per character")
    by_time.set(xlabel="wall time (minutes; compiling and evaluating included)")
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
    by_step.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _unique_names(workdirs: Sequence[str]) -> list[str]:
    """Workdir names for the table; the paths as given where two names would be the same."""
    names = [Path(w).name for w in workdirs]
    return [n if names.count(n) == 1 else w for n, w in zip(names, workdirs, strict=True)]


def main(argv: list[str]) -> None:
    try:
        workdirs = argv[1:]
        if not workdirs:
            raise UsageError("Give one or more workdirs: python -m lstm_jax.report RUN...")
        runs = [summarize(w, n) for w, n in zip(workdirs, _unique_names(workdirs), strict=True)]
        print(format_table(runs))
        plot_curves(runs, _OUT.value)
        print(f"Wrote {_OUT.value}.", file=sys.stderr)
    except UserError as e:  # One line and the exit code, like the other commands.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    from lstm_jax.cli import quiet_when_reader_goes

    app.run(quiet_when_reader_goes(main))
