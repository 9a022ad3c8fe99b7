"""The architecture study (issue 27, item 6): every cell at about the same parameter count, the
same steps and seeds, one population run each; then the best cells again with --block=prenorm.

    nice python experiments/cell_study.py [--out=runs/cell_study] [--steps=1000] [--seeds=3] \\
        [--target=1000000] [--cells=lstm,gru,...] [--block=plain] [--prenorm=4] [--plan]

- The width of each (cell, block) is the multiple of 16 whose parameter count is nearest to
  --target, found by bisection over the model's own parameter tree (`jax.eval_shape`, nothing
  is allocated); `--plan` prints the widths and stops.
- Each run is `python -m lstm_jax.main --seeds=K` in OUT/CELL_BLOCK with the recipe below: a
  population of K seeds trained in one job, each member chosen on validation and scored once on
  test (its results.json). A finished run (results.json present) is not trained again, so the
  study resumes where it stopped.
- After the plain runs, the --prenorm best cells by mean validation bpc (of every plain row in
  OUT/study.json, earlier invocations' too) are run with --block=prenorm. `--block=prenorm
  --cells=A,B` runs just those cells pre-norm.
- Prints the table (mean +/- std over seeds, chars/s of the whole population and per member,
  training time) and writes it to OUT/study.md and OUT/study.json, merged with the rows that
  earlier invocations wrote there (a row per cell and block).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from lstm_jax.errors import UserError

CELLS = ("lstm", "gru", "lstm_ln", "slstm", "mogrifier", "minlstm", "rglru", "mlstm", "attention")

# The headline recipe's optimiser and regulariser at a size that lets 13 populations of 3 train
# on a 2-core CPU in a few hours: 1000 steps of 32 x 64 characters (2.7 passes over the text).
RECIPE = (
    "--embed_dim=64", "--num_layers=2", "--dropout=0.2", "--seq_len=64", "--global_batch=32",
    "--optimizer=adamw", "--learning_rate=0.002", "--weight_decay=0.01", "--warmup_steps=100",
    "--schedule=cosine", "--grad_clip=5", "--log_every=50", "--eval_every=250",
    "--checkpoint_every=250", "--length=200",
)  # fmt: skip


def parameters(cell: str, block: str, hidden: int) -> int:
    import jax

    from lstm_jax.model_config import ModelConfig
    from lstm_jax.models import CharLSTM, count_params, init_params

    model = CharLSTM(ModelConfig(cell=cell, block=block, hidden=hidden, embed_dim=64), 96)
    return count_params(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))


def width_for(cell: str, block: str, target: int) -> tuple[int, int]:
    """The multiple of 16 whose model has the parameter count nearest to target (monotone in it)."""
    low, high = 1, 256  # in units of 16
    while parameters(cell, block, 16 * high) < target:
        high *= 2
    while high - low > 1:
        middle = (low + high) // 2
        if parameters(cell, block, 16 * middle) < target:
            low = middle
        else:
            high = middle
    counts = {16 * k: parameters(cell, block, 16 * k) for k in (low, high)}
    hidden = min(counts, key=lambda h: abs(counts[h] - target))
    return hidden, counts[hidden]


def train(workdir: str, cell: str, block: str, hidden: int, steps: int, seeds: int) -> None:
    if os.path.exists(os.path.join(workdir, "results.json")):
        print(f"{workdir}: done before, kept", flush=True)
        return
    command = [
        sys.executable, "-m", "lstm_jax.main", f"--workdir={workdir}", f"--cell={cell}",
        f"--block={block}", f"--hidden={hidden}", f"--num_steps={steps}", f"--seeds={seeds}",
        *RECIPE,
    ]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    started = time.time()
    with open(f"{workdir}.log", "a") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        raise UserError(
            f"the run in {workdir} stopped with exit status {finished.returncode}; its last "
            f"lines in {workdir}.log say why (the study resumes when run again)."
        )
    print(f"{workdir}: {time.time() - started:.0f} s", flush=True)


def summary(workdir: str, cell: str, block: str, hidden: int) -> dict[str, Any]:
    with open(os.path.join(workdir, "results.json")) as f:
        group = json.load(f)["groups"][0]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    start = records[0]
    windows = [r for r in records if "chars_per_second" in r]
    # The first window includes compiling; the others are steady training.
    speeds = sorted(r["chars_per_second"] for r in windows[1:]) or [0.0]
    total = speeds[len(speeds) // 2]
    return {
        "cell": cell, "block": block, "hidden": hidden, "parameters": start["parameters"],
        "members": start["members"], "steps": windows[-1]["step"],
        "val_mean": group["val_bpc_mean"], "val_std": group["val_bpc_std"],
        "test_mean": group["test_bpc_mean"], "test_std": group["test_bpc_std"],
        "chars_per_second": total, "chars_per_second_per_member": total / start["members"],
        "train_seconds": windows[-1]["train_seconds"], "wall_seconds": windows[-1]["wall_seconds"],
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    best = min(rows, key=lambda r: r["val_mean"])
    lines = [
        "| cell | block | hidden | parameters | val bpc | test bpc | chars/s (all, per member) "
        "| training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["val_mean"]):
        mark = "**" if r is best else ""
        lines.append(
            f"| {mark}{r['cell']}{mark} | {r['block']} | {r['hidden']} | {r['parameters']:,} "
            f"| {r['val_mean']:.4f} ± {r['val_std']:.4f} | {r['test_mean']:.4f} ± "
            f"{r['test_std']:.4f} | {r['chars_per_second']:,.0f}, "
            f"{r['chars_per_second_per_member']:,.0f} | {r['train_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/cell_study")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=int, default=1_000_000, help="Parameters per model.")
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument(
        "--block", default="plain", choices=("plain", "prenorm"), help="The block of --cells' runs."
    )
    parser.add_argument(
        "--prenorm", type=int, help="With --block=plain: best plain cells run prenorm (4)."
    )
    parser.add_argument("--plan", action="store_true", help="Print the widths; train nothing.")
    args = parser.parse_args()
    cells = [c for c in args.cells.split(",") if c]
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        parser.error(f"unknown --cells {unknown}; choose from {', '.join(CELLS)}")
    if args.block == "prenorm" and args.prenorm is not None:
        parser.error("--prenorm picks the plain leaders; with --block=prenorm name them in --cells")
    os.makedirs(args.out, exist_ok=True)

    def run(cell: str, block: str) -> dict[str, Any]:
        hidden, count = width_for(cell, block, args.target)
        print(f"{cell}, {block}: --hidden={hidden}, {count:,} parameters", flush=True)
        workdir = os.path.join(args.out, f"{cell}_{block}")
        if args.plan:
            return {}
        train(workdir, cell, block, hidden, args.steps, args.seeds)
        return summary(workdir, cell, block, hidden)

    saved = os.path.join(args.out, "study.json")
    rows: list[dict[str, Any]] = []
    if os.path.exists(saved):
        with open(saved) as f:
            rows = json.load(f)

    def save(row: dict[str, Any]) -> None:
        # After every run, so that a study stopped half way has its table so far.
        rows[:] = [r for r in rows if (r["cell"], r["block"]) != (row["cell"], row["block"])]
        rows.append(row)
        with open(os.path.join(args.out, "study.md"), "w") as f:
            f.write(table(rows) + "\n")
        with open(saved, "w") as f:
            json.dump(rows, f, indent=1)

    for cell in cells:
        row = run(cell, args.block)
        if not args.plan:
            save(row)
    if args.plan:
        return
    if args.block == "plain":
        plain = [r for r in rows if r["block"] == "plain"]
        leaders = 4 if args.prenorm is None else args.prenorm
        for leader in sorted(plain, key=lambda r: r["val_mean"])[:leaders]:
            save(run(leader["cell"], "prenorm"))
    print(table(rows))


if __name__ == "__main__":
    from lstm_jax.cli import user_errors

    with user_errors():
        main()
