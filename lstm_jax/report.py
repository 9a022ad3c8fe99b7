"""Compare runs at a glance: a table of their results and their validation curves.

    python -m lstm_jax.report runs/cells/lstm runs/cells/gru ... [--out=curves.png]

Reads only each workdir's `metrics.jsonl` (no JAX, no checkpoints), so it also works while the
runs are still training. Prints a Markdown table, one row per run, in the order given:

    run          the workdir's name
    cell         --cell
    parameters   trainable parameters
    steps        the last step logged
    wall time    wall-clock time of the run, compiling and evaluating included, resumes summed
    best val bpc the lowest validation bits per character (a population: its best group's mean)
    chars/s      training throughput: characters trained / training seconds (compiling,
                 evaluating and checkpointing left out), over the whole run; a population's
                 counts every member's characters

and writes `--out` (curves.png): validation bpc against steps and against wall time, every run
on the same axes. The plot needs matplotlib, an optional extra: `pip install 'lstm_jax[report]'`.

A population (`--seeds`, `--grid`) is shown by its groups, the members that share grid settings:
a second table of mean +/- standard deviation over the seeds (from `results.json` once the run
has finished, else the members' best validation so far), the best group by validation marked,
and each group's difference from that best group with a 95% confidence interval from the
per-seed results, paired by seed where both groups have the same seeds (Welch's otherwise).
Groups from separate runs compare the same way: train settings that a grid cannot vary (`hidden`,
`cell`, ...) as separate population runs with the same `--seeds`, and give both workdirs. The
curves of a group are its mean over the seeds with a band from the lowest to the highest member.

Resumed runs append to their metrics.jsonl; the records after the checkpoint a run resumed from
were trained again, so the second copy wins, and a `--restart` drops everything before it. A line
that is not a record (torn by a killed run, damaged) is skipped with a warning naming file:line.
"""

from __future__ import annotations

import dataclasses
import json
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
    # A population's groups (members with the same grid settings); one group for a single run.
    groups: list[Group] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Group:
    """Members of one run that share grid settings: their per-seed results and curves."""

    run: str
    settings: dict[str, Any]
    val_bpc: dict[int, float]  # By seed: the member's best validation bpc.
    test_bpc: dict[int, float]  # By seed; empty until the run has tested.
    # (step, the members' val bpc, one per seed in `val_bpc`'s order) for every evaluation.
    val_curves: list[tuple[int, list[float]]]

    def label(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.run} {values}" if values else self.run


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
            chars_per_second *= start.get("members", 1)  # Every member trains its own batch.
    # The checkpoint's model at each evaluation: the parameters, or their average if better.
    val_curve = [
        (step, r.get("wall_seconds"), min(r["val_bpc"], r.get("ema_val_bpc", math.inf)))
        for step, r in sorted(val.items())
    ]
    tests = [r["test_bpc"] for r in records if "test_bpc" in r and "member" not in r]
    name = name or Path(workdir).name
    groups = _groups(Path(workdir).expanduser(), name, start, records) if "members" in start else []
    if groups:  # A population: the best group's mean, as the run's row.
        best = min(groups, key=lambda g: _mean(g.val_bpc))
        tests, best_val_bpc = [_mean(best.test_bpc)], _mean(best.val_bpc)
    else:
        best_val_bpc = min((bpc for _, _, bpc in val_curve), default=math.nan)
    return RunSummary(
        name=name,
        cell=start.get("cell"),
        parameters=start.get("parameters"),
        steps=max((r.get("step", 0) for r in records), default=0),
        wall_seconds=timed[-1]["wall_seconds"] if timed else None,
        best_val_bpc=best_val_bpc,
        test_bpc=tests[-1] if tests else math.nan,
        chars_per_second=chars_per_second,
        val_curve=val_curve,
        groups=groups,
    )


def _groups(
    workdir: Path, name: str, start: dict[str, Any], records: list[dict[str, Any]]
) -> list[Group]:
    """A population's groups, from its metrics (validation so far) and results.json (test)."""
    seeds, settings = start.get("member_seeds"), start.get("member_settings")
    if seeds is None or settings is None:
        return []
    val = {r["step"]: r for r in records if isinstance(r.get("member_val_bpc"), list)}
    curves = [(step, r["member_val_bpc"]) for step, r in sorted(val.items())]
    tests: dict[int, float] = {}
    try:
        rows = json.loads((workdir / "results.json").read_text())["members"]
        tests = {r["member"]: r["test_bpc"] for r in rows if isinstance(r["test_bpc"], float)}
    except (OSError, ValueError, KeyError, TypeError):  # Not finished yet, or edited.
        pass
    by_settings: dict[str, list[int]] = {}
    for i, values in enumerate(settings):
        by_settings.setdefault(json.dumps(values, sort_keys=True), []).append(i)
    groups = []
    for members in by_settings.values():
        # A member's best: its lowest validation so far (raw or moving-average parameters).
        best = {
            seeds[i]: min((c[i] for _, c in curves if len(c) > i), default=math.nan)
            for i in members
        }
        ema = {r["step"]: r["member_ema_val_bpc"] for r in records if "member_ema_val_bpc" in r}
        for values in ema.values():
            for i in members:
                best[seeds[i]] = min(best[seeds[i]], values[i])
        groups.append(
            Group(
                run=name,
                settings=settings[members[0]],
                val_bpc=best,
                test_bpc={seeds[i]: tests[i] for i in members if i in tests},
                val_curves=[(step, [c[i] for i in members]) for step, c in curves],
            )
        )
    return groups


def _mean(values: dict[int, float]) -> float:
    return float(sum(values.values()) / len(values)) if values else math.nan


def _mean_std(values: dict[int, float]) -> str:
    if not values or math.isnan(_mean(values)):
        return "-"
    mean, n = _mean(values), len(values)
    if n == 1:
        return f"{mean:.4f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values.values()) / (n - 1))
    return f"{mean:.4f} +/- {std:.4f}"


def format_groups(groups: Sequence[Group]) -> str:
    """The groups as a Markdown table, mean +/- std over seeds, the best by validation marked,
    then each group's difference from the best with its 95% confidence interval."""
    from lstm_jax.population import compare  # numpy only; no JAX.

    best = min(range(len(groups)), key=lambda i: (_mean(groups[i].val_bpc), i))
    lines = [
        "| group | seeds | val bpc | test bpc | |",
        "|---|---|---|---|---|",
    ]
    for i, g in enumerate(groups):
        mark = "best by validation" if i == best else ""
        seeds = ",".join(str(s) for s in g.val_bpc)
        lines.append(
            f"| {g.label()} | {seeds} | {_mean_std(g.val_bpc)} | {_mean_std(g.test_bpc)} | {mark} |"
        )
    lines += [
        "",
        f"Difference from {groups[best].label()} (group minus best; 95% CI, paired by seed where "
        "the seeds match, else Welch):",
        "| group | val bpc | test bpc |",
        "|---|---|---|",
    ]
    for i, g in enumerate(groups):
        if i != best:
            cells = [_difference(compare, groups[best], g, key) for key in ("val_bpc", "test_bpc")]
            lines.append(f"| {g.label()} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _difference(compare: Any, best: Group, other: Group, key: str) -> str:
    a, b = getattr(best, key), getattr(other, key)
    if not a or not b:
        return "-"
    delta, low, high, paired = compare(a, b)
    if math.isnan(low):
        return f"{delta:+.4f} (one seed: no interval)"
    return f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]{' paired' if paired else ''}"


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
        if run.groups:  # A population: each group's mean over seeds, a band to its extremes.
            seconds = {step: wall for step, wall, _ in run.val_curve if wall is not None}
            for group in run.groups:
                line = _plot_group(by_step, group, {step: step for step, _ in group.val_curves})
                _plot_group(by_time, group, {s: w / 60 for s, w in seconds.items()}, line)
            continue
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


def _plot_group(axes: Any, group: Group, x_of_step: dict[int, float], like: Any = None) -> Any:
    """The group's mean validation curve against x, with a band to its lowest and highest
    member; the line (or `like`'s colour, so both panels agree)."""
    points = [(x_of_step[step], bpc) for step, bpc in group.val_curves if step in x_of_step]
    xs, values = [x for x, _ in points], [bpc for _, bpc in points]
    mean = [sum(v) / len(v) for v in values]
    label = f"{group.label()} (mean of {len(group.val_bpc)} seeds)"
    colour = None if like is None else like.get_color()
    (line,) = axes.plot(xs, mean, marker=".", label=label, color=colour)
    if len(group.val_bpc) > 1:
        low, high = [min(v) for v in values], [max(v) for v in values]
        axes.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


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
        groups = [g for run in runs for g in run.groups]
        if len(groups) > 1 or any(len(g.val_bpc) > 1 for g in groups):
            print("\n" + format_groups(groups))
        plot_curves(runs, _OUT.value)
        print(f"Wrote {_OUT.value}.", file=sys.stderr)
    except UserError as e:  # One line and the exit code, like the other commands.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    from lstm_jax.cli import quiet_when_reader_goes

    app.run(quiet_when_reader_goes(main))
