"""Validation and test bpc of every checkpoint of runs, for learning curves.

    python experiments/score_checkpoints.py runs/dracula_wd runs/dracula_mogrifier \\
        [--streams=32] [--val_fraction=0.05 --test_fraction=0.1] [--json=curves.json] \\
        [--png=docs/quality_curves.png]

Each checkpoint's model (its parameters, or their average where that was better) scores the
validation and the test text of its run's split, each read as --streams contiguous streams (32:
fast; `python -m lstm_jax.evaluate` gives the one-stream figures the tables report). The
fractions override the run's saved split: a run trained before --test_fraction existed with
--val_fraction=0.15 trained on exactly the text that 0.05 / 0.1 leave for training, so its
checkpoints can be scored on today's split. Prints one row per checkpoint: the row with the
lowest validation bpc is the run's best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lstm_jax.checkpoint import Checkpoints
from lstm_jax.cli import user_errors
from lstm_jax.data import load_split
from lstm_jax.evaluate import run_data_config, score_ids
from lstm_jax.reader import restore_model
from lstm_jax.steps import bits_per_char


def score_run(workdir: str, streams: int, fractions: dict) -> list[dict]:
    checkpoints = Checkpoints(workdir, read_only=True)
    steps = checkpoints.steps()
    checkpoints.close()
    rows, split = [], None
    for step in steps:
        model, params, vocab, _, meta = restore_model(workdir, str(step))
        if split is None:
            data = dataclasses.replace(run_data_config(meta), **fractions)
            _, split, _ = load_split(data, lambda _, vocab=vocab: vocab)
        row = {
            "step": step,
            "wall_seconds": meta.get("wall_seconds"),
            "train_seconds": meta.get("train_seconds"),
            "model": meta.get("selected", "params"),
            "val_bpc": bits_per_char(score_ids(model, params, split.val, streams)),
            "test_bpc": bits_per_char(score_ids(model, params, split.test, streams)),
        }
        rows.append(row)
        print(
            f"{workdir} step {step:>5} ({row['model']}): wall {row['wall_seconds'] or 0:7.0f} s, "
            f"val {row['val_bpc']:.4f}, test {row['test_bpc']:.4f} bpc",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="*")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--val_fraction", type=float)
    parser.add_argument("--test_fraction", type=float)
    parser.add_argument("--json")
    parser.add_argument("--png")
    parser.add_argument("--from_json", help="Plot curves saved by --json instead of scoring.")
    args = parser.parse_args()
    if args.from_json:
        if not args.png or not Path(args.from_json).is_file():
            parser.error("--from_json needs a curves file written by --json, and --png=OUT.png")
        plot(json.loads(Path(args.from_json).read_text()), args.png)
        return
    if not args.workdirs:
        parser.error("give the run folders to score, or --from_json=CURVES.json --png=OUT.png")
    for workdir in args.workdirs:
        if not (Path(workdir) / "checkpoints").is_dir():
            parser.error(f"{workdir} has no checkpoints/ folder: give run folders of lstm_jax.main")
    fractions = {
        name: getattr(args, name)
        for name in ("val_fraction", "test_fraction")
        if getattr(args, name) is not None
    }
    curves = {workdir: score_run(workdir, args.streams, fractions) for workdir in args.workdirs}
    if empty := [workdir for workdir, rows in curves.items() if not rows]:
        parser.error(f"no checkpoint to score in {', '.join(empty)}: train first")
    for workdir, rows in curves.items():
        best = min(rows, key=lambda r: r["val_bpc"])
        print(f"{workdir}: best by validation step {best['step']}: val {best['val_bpc']:.4f}, "
              f"test {best['test_bpc']:.4f} bpc ({args.streams} streams)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(curves, indent=1))
    if args.png:
        plot(curves, args.png)


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, key, title in ((axes[0], "val_bpc", "validation"), (axes[1], "test_bpc", "test")):
        for workdir, rows in curves.items():
            steps = [r["step"] for r in rows]
            axis.plot(steps, [r[key] for r in rows], marker=".", label=Path(workdir).name)
        axis.set_title(f"{title} bpc")
        # Steps, not seconds: the study's runs shared the machine, so their clocks overlap.
        axis.set_xlabel("training step (32 x 100 characters each)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("bits per character")
    axes[0].set_ylim(top=2.4)
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    with user_errors():  # A missing or damaged workdir: one line, no traceback.
        main()
