"""The quality issue's table for a population: every lever alone and together, each chosen on
validation and scored once on test, the single-model rows as mean +/- std over the members.

    python experiments/cache_sweep.py runs/dracula_20min_seeds3 [--thetas=0.2,0.4,0.8,1.6] \\
        [--lambdas=0.05,0.1,0.2] [--lrs=5e-5,1e-4] [--decay=0.01] [--segment=50]

The levers (`python -m lstm_jax.evaluate` gives each of these numbers with the chosen settings):
- static: each member alone (`--member=K`);
- + cache: each member's (theta, lambda) chosen on validation from the grid (`--cache`);
- + dynamic: dynamic evaluation's lr chosen on member 0's validation score, decay fixed
  (`--dynamic`); every member then uses that lr, scored on test only (dynamic evaluation costs);
- + dynamic + cache: member 0's best static theta, lambda chosen again on member 0's
  validation score with dynamic evaluation on; every member uses that pair;
- the ensemble of all members (`--ensemble=W`): static, + cache (its own grid on validation),
  + dynamic + cache (the single members' dynamic lr and cache pair, scored on test only).

All of it runs through `lstm_jax.scoring` (the path of `evaluate --cache/--ensemble`), whose
hyperparameters are traced: one compile per lever, not per grid point. Prints each score as it
comes and the table last, with the time each row took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lstm_jax.cache import CacheConfig
from lstm_jax.cli import user_errors
from lstm_jax.data import Batcher, load_split
from lstm_jax.dynamic import gradient_rms
from lstm_jax.evaluate import run_data_config
from lstm_jax.reader import population_size, restore_model
from lstm_jax.scoring import Adapt, Member, score
from lstm_jax.steps import bits_per_char


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="A population's run folder (--seeds).")
    parser.add_argument("--thetas", default="0.2,0.4,0.8,1.6")
    parser.add_argument("--lambdas", default="0.05,0.1,0.2")
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--lrs", default="5e-5,1e-4")
    parser.add_argument("--decay", type=float, default=0.01)
    parser.add_argument("--segment", type=int, default=50)
    parser.add_argument("--stat_batches", type=int, default=40)
    parser.add_argument("--no_dynamic", action="store_true", help="Only the static levers.")
    args = parser.parse_args()

    size = population_size(args.workdir)
    if not size:
        parser.error(f"{args.workdir} is a single run; this sweep wants a population (--seeds).")
    restored = [restore_model(args.workdir, "best", k) for k in range(size)]
    _, _, vocab, _, meta = restored[0]
    data = run_data_config(meta)
    _, split, _ = load_split(data, lambda _: vocab)
    members = [Member(model, params) for model, params, *_ in restored]
    texts = {"val": split.val, "test": split.test}

    def bpc(chosen: list[Member], part: str, cache=None, adapt=None) -> float:
        return bits_per_char(score(chosen, texts[part], cache=cache, adapt=adapt)[0])

    def cache(theta: float, lam: float) -> CacheConfig:
        return CacheConfig(
            cache=True, cache_window=args.window, cache_theta=theta, cache_lambda=lam
        )

    def best_cache(chosen: list[Member], adapt=None, thetas=None) -> tuple[float, float]:
        grid = {}
        for theta in thetas or _floats(args.thetas):
            for lam in _floats(args.lambdas):
                grid[theta, lam] = bpc(chosen, "val", cache(theta, lam), adapt)
                print(f"  theta {theta:g} lambda {lam:g}: val {grid[theta, lam]:.4f}", flush=True)
        return min(grid, key=grid.get)

    rows: dict[str, list[tuple[float, float]]] = {}  # lever -> [(val, test)] per member or one.
    notes: dict[str, list[str]] = {}

    def record(lever: str, val: float, test: float, note: str = "") -> None:
        """val nan: not scored (dynamic evaluation's cost: only member 0's, from its grid)."""
        rows.setdefault(lever, []).append((val, test))
        notes.setdefault(lever, []).append(note)
        print(f"{lever}: val {val:.4f} / test {test:.4f} {note}", flush=True)

    started = time.perf_counter()
    chosen_cache = []
    for member in members:
        record("static", bpc([member], "val"), bpc([member], "test"))
        theta, lam = best_cache([member])
        chosen_cache.append((theta, lam))
        c = cache(theta, lam)
        record("+ cache", bpc([member], "val", c), bpc([member], "test", c),
               f"theta {theta:g}, lambda {lam:g}")  # fmt: skip
    print(f"static levers of the members: {time.perf_counter() - started:.0f} s", flush=True)

    if not args.no_dynamic:
        started = time.perf_counter()
        batcher = Batcher(split.train, data.seq_len, data.global_batch, data.seed, data.carry_state)
        members = [
            Member(m.model, m.params, gradient_rms(m.model, m.params, batcher, args.stat_batches))
            for m in members
        ]

        def adapt(lr: float) -> Adapt:
            return Adapt(lr=lr, decay=args.decay, segment=args.segment)

        lr_grid = {lr: bpc(members[:1], "val", adapt=adapt(lr)) for lr in _floats(args.lrs)}
        for lr, val in lr_grid.items():
            print(f"  member 0 dynamic lr {lr:g}: val {val:.4f}", flush=True)
        lr = min(lr_grid, key=lr_grid.get)
        for k, member in enumerate(members):
            val = lr_grid[lr] if k == 0 else float("nan")
            record("+ dynamic", val, bpc([member], "test", adapt=adapt(lr)), f"lr {lr:g}")
        theta0 = chosen_cache[0][0]
        lam_grid = {
            lam: bpc(members[:1], "val", cache(theta0, lam), adapt(lr))
            for lam in _floats(args.lambdas)
        }
        for lam, val in lam_grid.items():
            print(f"  member 0 dynamic + cache lambda {lam:g}: val {val:.4f}", flush=True)
        dyn_lam = min(lam_grid, key=lam_grid.get)
        c = cache(theta0, dyn_lam)
        for k, member in enumerate(members):
            val = lam_grid[dyn_lam] if k == 0 else float("nan")
            record("+ dynamic + cache", val, bpc([member], "test", c, adapt(lr)),
                   f"lr {lr:g}, theta {theta0:g}, lambda {dyn_lam:g}")  # fmt: skip
        print(f"dynamic levers of the members: {time.perf_counter() - started:.0f} s", flush=True)

    started = time.perf_counter()
    name = f"ensemble of {len(members)}"
    record(name, bpc(members, "val"), bpc(members, "test"))
    theta, lam = best_cache(members)
    c = cache(theta, lam)
    record(f"{name} + cache", bpc(members, "val", c), bpc(members, "test", c),
           f"theta {theta:g}, lambda {lam:g}")  # fmt: skip
    if not args.no_dynamic:
        c = cache(theta0, dyn_lam)
        record(f"{name} + dynamic + cache", float("nan"), bpc(members, "test", c, adapt(lr)),
               f"lr {lr:g}, theta {theta0:g}, lambda {dyn_lam:g}")  # fmt: skip
    print(f"ensemble levers: {time.perf_counter() - started:.0f} s", flush=True)

    print("\n| lever | val bpc | test bpc | settings (chosen on validation) |\n|---|---|---|---|")
    for lever, scores in rows.items():
        cells = [_summary(np.array(column)) for column in zip(*scores, strict=True)]
        settings = "; ".join(dict.fromkeys(n for n in notes[lever] if n)) or "-"
        print(f"| {lever} | {cells[0]} | {cells[1]} | {settings} |")


def _summary(scores: np.ndarray) -> str:
    """Mean +/- std (n - 1) over the members scored; one member's score; '-' for none."""
    scored = scores[~np.isnan(scores)]
    if len(scored) == 0:
        return "-"
    if len(scored) == 1:
        return f"{scored[0]:.4f}" + (" (member 0)" if len(scores) > 1 else "")
    return f"{scored.mean():.4f} +/- {scored.std(ddof=1):.4f}"


if __name__ == "__main__":
    with user_errors():  # A missing or damaged workdir: one line, no traceback.
        main()
