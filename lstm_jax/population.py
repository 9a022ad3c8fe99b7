"""Populations: many runs in one job (`--seeds=K --grid='learning_rate=0.002,0.004;...'`).

A population is every combination of the grid's values times K seeds (s, s+1, ..., s+K-1 from
`--seed`), each member a whole run of its own: its own initialisation, batches, dropout masks,
carried state, optimizer state, EMA, best checkpoint and test score. They train together in
one jitted step, `vmap`ped over a leading member axis of the train state (`lstm_jax.parallel`
maps it over devices); the step itself stays a pure function of one member (`lstm_jax.steps`),
with the member's varying settings as traced values (`steps.Hyperparams`).

This module owns what a population is: the grid (parsed and checked like the flags), the
members' settings, their initial states stacked, and the results (`results.json`: one row per
member, mean and standard deviation per group of seeds, and paired differences of groups).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lstm_jax import steps
from lstm_jax.config import Config, leaf_fields
from lstm_jax.errors import UsageError
from lstm_jax.models import build_model

# The settings a grid may vary: none changes a shape or the program (steps.Hyperparams).
GRID_AXES = steps.OPTIMIZER_HPARAMS + steps.RATE_HPARAMS
RESULTS_FILE = "results.json"


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of a population: its index, seed, grid values and whole run config."""

    index: int
    seed: int
    settings: dict[str, float | int]  # The grid's values (empty without a grid).
    config: Config

    def label(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"member {self.index} (seed {self.seed}{', ' + values if values else ''})"


def parse_grid(grid: str) -> dict[str, list[str]]:
    """'a=1,2;b=3' -> {"a": ["1", "2"], "b": ["3"]}; a `UsageError` names what is malformed."""
    axes: dict[str, list[str]] = {}
    for part in grid.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, values = part.partition("=")
        name = name.strip().removeprefix("--")
        listed = [v.strip() for v in values.split(",")]
        if not sep or not name or not values.strip() or "" in listed:
            raise UsageError(
                f"--grid: {part!r} is not NAME=V1,V2,...; write e.g. "
                "--grid='learning_rate=0.002,0.004;dropout=0.2,0.3'."
            )
        if name in axes:
            raise UsageError(f"--grid names {name} twice; give each setting once, all its values.")
        axes[name] = listed
    if grid.strip() and not axes:
        raise UsageError("--grid is empty; write e.g. --grid='learning_rate=0.002,0.004'.")
    return axes


def members(config: Config) -> list[Member]:
    """The population of `config` (`--seeds`, `--grid`): grid combinations in the order given,
    each with K seeds; a `UsageError` for a grid axis that is unknown, changes the program, or
    has a value out of its range (the flag's own range check)."""
    pop = config.population
    axes = parse_grid(pop.grid)
    types = {f.name: t for _, f, t in leaf_fields(Config)}
    for name, values in axes.items():
        if name not in types:
            raise UsageError(f"--grid: no setting is called {name}; see --help for the names.")
        if name not in GRID_AXES:
            raise UsageError(
                f"--grid cannot vary {name}: it changes the parameters' shapes or the program. "
                "Run each value as its own run (its own --workdir) and compare them with python "
                f"-m lstm_jax.report. A grid may vary {', '.join(GRID_AXES)}."
            )
        if name in ("grad_clip", "ema_decay") and any(float(v) == 0 for v in values):
            raise UsageError(
                f"--grid: {name}=0 turns it off, which changes the optimizer's state; run it as "
                f"its own run, or give {name} only positive values."
            )
        if values != list(dict.fromkeys(values)):
            raise UsageError(f"--grid lists a value of {name} twice; give each value once.")
    last_seed = config.data.seed + pop.seeds - 1
    if last_seed > 2**32 - 1:
        raise UsageError(
            f"--seed={config.data.seed} with --seeds={pop.seeds} goes past the last seed, "
            f"{2**32 - 1}; lower --seed."
        )
    parsed = {name: [_number(name, v, types[name]) for v in vals] for name, vals in axes.items()}
    out = []
    for combination in itertools.product(*parsed.values()):
        settings = dict(zip(parsed, combination, strict=True))
        for k in range(pop.seeds):
            seed = config.data.seed + k
            member_config = config.replace(**settings, seed=seed)
            member_config.validate()  # The flags' own range and combination checks.
            out.append(Member(len(out), seed, settings, member_config))
    return out


def is_population(config: Config) -> bool:
    return config.population.seeds > 1 or bool(config.population.grid.strip())


def _number(name: str, text: str, kind: type) -> float | int:
    try:
        return int(text) if kind is int else float(text)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise UsageError(f"--grid: {name}={text!r} is not {wanted}.") from None


def single_run_configs(population: Sequence[Member]) -> list[Config]:
    """Each member's settings as a single run: what `--seeds=1` and no grid would train."""
    return [m.config.replace(seeds=1, grid="") for m in population]


# --- The population's state ------------------------------------------------------------------


def model_config(config: Config, population: Sequence[Member]) -> Config:
    """The config the population's one program is built from: the run's, with each varying
    dropout at its largest value, so that it acts wherever one member needs it (a member at
    rate 0 draws masks that keep everything)."""
    changes = {}
    for name in steps.RATE_HPARAMS:
        changes[name] = max(getattr(m.config.regularization, name) for m in population)
    return config.replace(**changes)


def init_states(population: Sequence[Member], vocab_size: int, total_steps: int):
    """(model, the members' train states stacked on a leading axis, their Hyperparams): each
    state is exactly `steps.init_state` of the member's own config."""
    states = [steps.init_state(m.config, vocab_size, total_steps)[1] for m in population]
    model = build_model(model_config(population[0].config, population), vocab_size)
    # Leaf by leaf: the members' states differ in their static fields (optimizer, EMA decay).
    template = states[0].replace(apply_fn=model.apply)
    leaves = [jax.tree.leaves(s) for s in states]
    columns = [np.stack([np.asarray(x) for x in xs]) for xs in zip(*leaves, strict=True)]
    stacked = jax.tree.unflatten(jax.tree.structure(template), columns)
    hparams = steps.Hyperparams.stack(
        [m.config.optim for m in population],
        [m.config.regularization for m in population],
        total_steps,
    )
    return model, stacked, hparams


def refuse_what_a_population_cannot_do(config: Config, population: Sequence[Member]) -> None:
    """One-line refusals of what a population does not support (yet), before anything runs."""
    if config.init.init_from:
        raise UsageError(
            "--init_from starts one run from a checkpoint; a population (--seeds, --grid) starts "
            "every member from its own seed. Drop --init_from, or --seeds and --grid."
        )
    if jax.process_count() > 1:
        raise UsageError(
            "A population (--seeds, --grid) runs in one process (all its local devices) for "
            "now; run it on one host, or run each member as its own multi-host run."
        )


def refuse_beyond_memory(
    config: Config, vocab_size: int, population: Sequence[Member], layout: Any
) -> None:
    """A `UsageError` when the members on one device need more than the machine's memory, by
    `lstm_jax.memory`'s estimate, before anything is compiled; it names what to lower."""
    from lstm_jax.memory import physical_memory_bytes, training_bytes

    per_member = sum(training_bytes(config, vocab_size).values())
    on_one_device = len(population) // len(layout.devices) if layout.sharded else len(population)
    memory = physical_memory_bytes()
    if memory is None or per_member * on_one_device <= memory:
        return
    raise UsageError(
        f"A population of {len(population)} members ({on_one_device} on each device) needs "
        f"about {per_member * on_one_device / 2**30:,.1f} GiB, more than this machine's "
        f"{memory / 2**30:,.1f} GiB ({per_member / 2**30:,.2f} GiB a member). Lower --seeds or "
        "the grid's values, or the model's sizes."
    )


def start_record(population: Sequence[Member]) -> dict[str, Any]:
    """What metrics.jsonl's start record says of a population: how many members, their seeds
    and grid settings (what `report` groups their curves by while they train)."""
    return {
        "members": len(population),
        "member_seeds": [m.seed for m in population],
        "member_settings": [m.settings for m in population],
    }


def best_member(progress: Sequence[Any]) -> int:
    """The member whose best validation loss is lowest (the first on a tie, or without any)."""
    return min(range(len(progress)), key=lambda i: (progress[i].best_val_loss, i))


# --- Results ---------------------------------------------------------------------------------


def group_rows(member_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Members with the same grid settings -> one row: n, mean and standard deviation (ddof 1,
    NaN for one seed) of validation and test bpc, in the grid's order."""
    groups: dict[str, list[dict]] = {}
    for row in member_rows:
        groups.setdefault(json.dumps(row["settings"], sort_keys=True), []).append(row)
    out = []
    for rows in groups.values():
        seeds = [r["seed"] for r in rows]
        entry = {"settings": rows[0]["settings"], "n": len(rows), "seeds": seeds}
        for key in ("val_bpc", "test_bpc"):
            values = np.asarray([r[key] for r in rows], np.float64)
            entry[f"{key}_mean"] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        out.append(entry)
    return out


def best_group(groups: list[dict[str, Any]]) -> int:
    """Index of the group with the lowest mean validation bpc (the one to report)."""
    return min(range(len(groups)), key=lambda i: groups[i]["val_bpc_mean"])


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, the normal's.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t95(dof: int) -> float:
    return _T95[dof - 1] if dof <= len(_T95) else 1.960


def compare(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, bool]:
    """(mean of b minus mean of a, the 95% interval's low and high, paired) from per-seed
    results {seed: bpc}. Paired by seed where both have the same seeds (the differences'
    t-interval), else Welch's interval. NaN bounds with fewer than 2 seeds a side."""
    if sorted(a) == sorted(b) and len(a) > 1:
        diffs = np.asarray([b[s] - a[s] for s in sorted(a)], np.float64)
        half = t95(len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
        return float(diffs.mean()), float(diffs.mean() - half), float(diffs.mean() + half), True
    xa, xb = np.asarray(list(a.values())), np.asarray(list(b.values()))
    delta = float(xb.mean() - xa.mean())
    if len(xa) < 2 or len(xb) < 2:
        return delta, math.nan, math.nan, False
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    dof = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1)) if va + vb else 1e9
    half = t95(max(1, int(dof))) * math.sqrt(va + vb)
    return delta, delta - half, delta + half, False


def write_results(workdir: os.PathLike, member_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """WORKDIR/results.json, {"members": [...], "groups": [...]}, written atomically."""
    from etils import epath

    results = {"members": member_rows, "groups": group_rows(member_rows)}
    path = epath.Path(workdir) / RESULTS_FILE
    temporary = path.with_name(f".{RESULTS_FILE}.tmp")
    # Strict JSON (null where there is no number: a std over one seed), for any parser.
    temporary.write_text(json.dumps(_without_nan(results), indent=1, allow_nan=False) + "\n")
    temporary.replace(path)  # Over the last one: a resumed run writes it again.
    return results


def _without_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def groups_table(groups: list[dict[str, Any]]) -> str:
    """The groups as a text table, mean +/- std over seeds, the best by validation marked."""
    best = best_group(groups)
    lines = ["settings | n | val bpc | test bpc"]
    for i, g in enumerate(groups):
        settings = ", ".join(f"{k}={v}" for k, v in g["settings"].items()) or "(the run's)"
        lines.append(
            f"{settings} | {g['n']} | {_mean_std(g, 'val_bpc')} | {_mean_std(g, 'test_bpc')}"
            + (" | best by validation" if i == best else "")
        )
    return "\n".join(lines)


def _mean_std(group: dict[str, Any], key: str) -> str:
    mean, std = group[f"{key}_mean"], group[f"{key}_std"]
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" + ("" if math.isnan(std) else f" +/- {std:.4f}")
