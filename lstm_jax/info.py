"""Describe a run folder: its checkpoints and its model. `python -m lstm_jax.info WORKDIR`.

    python -m lstm_jax.info runs/default
    python -m lstm_jax.info --workdir=runs/default

Prints one line per checkpoint (step, validation and test bits per character where recorded,
wall-clock time; * marks the best), for a population its members (seed, grid settings, best
step, val and test bpc), then the model settings, the vocabulary size and the
parameter count. All of it comes from the checkpoints' metadata and the model's shapes: no
parameters are read, so it is quick on any run and never changes the folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

from absl import logging

from lstm_jax import cli
from lstm_jax.config import setting
from lstm_jax.errors import NoCheckpoint, UsageError, UserError
from lstm_jax.reader import MEMBER_HELP, beside_trainer, member_note


@dataclasses.dataclass(frozen=True)
class InfoOptions:
    """info: the run folder to describe"""

    workdir: str = setting(
        "", "Run folder to describe; or give it as the one argument: python -m lstm_jax.info DIR."
    )
    member: str = setting("", MEMBER_HELP + " Its validation is what the checkpoint rows show.")


def main(argv: list[str]) -> None:
    with cli.user_errors():
        options = cli.read_flags(InfoOptions)
        print(describe(_workdir(argv[1:], options.workdir), options.member))


def _workdir(arguments: list[str], flag: str) -> str:
    if len(arguments) + bool(flag) > 1:
        raise UsageError(
            f"Give one run folder, got {' '.join(arguments + ([flag] if flag else []))}: "
            "python -m lstm_jax.info WORKDIR."
        )
    if not arguments and not flag:
        raise UsageError("Give the run folder to describe: python -m lstm_jax.info WORKDIR.")
    return arguments[0] if arguments else flag


def describe(workdir: str, member: str = "") -> str:
    """The checkpoint table and the model of the run in `workdir`, as printed; for a population,
    the checkpoints as `member` saw them (by default the best by validation) and every member."""
    from lstm_jax.checkpoint import workdir_path

    if not workdir_path(workdir).is_dir():
        raise UserError(
            f"{workdir} does not exist; give a run folder (the --workdir of python -m "
            "lstm_jax.main)."
        )
    # Beside a running trainer the listing may change under it: read it again then.
    return beside_trainer(workdir, "latest", lambda reading: _describe(workdir, member, reading))


def _describe(workdir: str, member: str, reading: list[int]) -> str:
    from lstm_jax.checkpoint import Checkpoints
    from lstm_jax.reader import choose_member, member_meta, removed

    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise NoCheckpoint(
                f"No checkpoint in {checkpoints.directory}; train first with python -m "
                f"lstm_jax.main --workdir={workdir}."
            )
        metas, lines = {}, []
        for step in steps:
            try:
                metas[step] = checkpoints.read_meta(step)
            except Exception as e:  # noqa: BLE001 - a damaged one is listed, not fatal.
                if removed(workdir, step):  # By the running trainer, not damaged: list again.
                    reading.append(step)
                    raise UserError(f"Step {step} was removed while it was read.") from None
                lines.append((step, f"  {step:>8}  unreadable ({type(e).__name__})"))
        members = metas[max(metas)].get("members") if metas else None
        index = choose_member(members, member, workdir)
        best = checkpoints.best_step(index)
        tests = _test_results(workdir)
        if index is not None:
            tested = _member_tests(workdir).get(index)
            tests = {} if tested is None else {best: tested}
        for step, meta in metas.items():
            shown = meta if index is None else member_meta(meta, index)
            lines.append((step, _row(step, shown, tests.get(step), best=step == best)))
        lines = [line for _, line in sorted(lines)]
        latest_view = metas[max(metas)] if index is None else member_meta(metas[max(metas)], index)
        whose = member_note(latest_view).replace(", member", " of member", 1)
        lines.insert(
            0, f"{checkpoints.directory}: {len(steps)} checkpoint(s), * is the best{whose}"
        )
        lines.insert(1, f"  {'step':>8}  {'val bpc':>8}  {'test bpc':>8}  {'wall time':>10}")
    finally:
        checkpoints.close()
    if not metas:
        raise UserError(f"No checkpoint in {checkpoints.directory} can be read.")
    latest = metas[max(metas)]
    if members is not None:
        lines += _member_lines(members, _member_tests(workdir))
    return "\n".join(lines + _model_lines(latest))


def _text(value: Any) -> str:
    return "-" if not isinstance(value, float) or not math.isfinite(value) else f"{value:.4f}"


def _row(step: int, meta: dict[str, Any], test_bpc: float | None, *, best: bool) -> str:
    text = _text

    # The checkpoint's model: its parameters, or their average where that was better.
    val_loss = meta.get("selected_val_loss", meta.get("val_loss"))
    val_bpc = val_loss / math.log(2) if isinstance(val_loss, float) else None
    seconds = int(meta.get("wall_seconds", 0))
    wall = f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{'*' if best else ' '} {step:>8}  {text(val_bpc):>8}  {text(test_bpc):>8}  {wall:>10}"


def _test_results(workdir: str) -> dict[int, float]:
    """Test bpc by step, from the run's metrics.jsonl (a finished run tests its best checkpoint);
    unreadable lines are skipped with a warning, an unreadable file with one."""
    from lstm_jax.checkpoint import workdir_path
    from lstm_jax.records import read_metrics

    path = workdir_path(workdir) / "metrics.jsonl"
    if not path.is_file():  # A copied checkpoint folder may come without it.
        return {}
    try:
        records = read_metrics(path)
    except UserError as e:  # The checkpoints are what info shows; test bpc is a bonus.
        logging.warning("No test results: %s", e)
        return {}
    return {
        r["step"]: r["test_bpc"]
        for r in records
        if isinstance(r.get("test_bpc"), float) and "member" not in r
    }


def _member_tests(workdir: str) -> dict[int, float]:
    """A population's test bpc by member, from results.json (written at the end of a run)."""
    from lstm_jax.checkpoint import workdir_path
    from lstm_jax.population import RESULTS_FILE

    try:
        rows = json.loads((workdir_path(workdir) / RESULTS_FILE).read_text())["members"]
        return {r["member"]: r["test_bpc"] for r in rows if isinstance(r.get("test_bpc"), float)}
    except (OSError, ValueError, KeyError, TypeError):  # Not written yet, or edited.
        return {}


def _member_lines(members: list[dict[str, Any]], tests: dict[int, float]) -> list[str]:
    """One line per population member: seed, grid settings, best step, val and test bpc."""
    best = min(range(len(members)), key=lambda i: (members[i]["best_val_loss"], i))
    lines = [f"{len(members)} members (--member=K picks one), * is the best by validation"]
    lines.append(f"  {'member':>8}  {'seed':>6}  {'best step':>9}  {'val bpc':>8}  {'test bpc':>8}")
    for i, m in enumerate(members):
        val = m["best_val_loss"] / math.log(2) if math.isfinite(m["best_val_loss"]) else None
        settings = ", ".join(f"{k}={v}" for k, v in m["settings"].items())
        lines.append(
            f"{'*' if i == best else ' '} {i:>8}  {m['seed']:>6}  {m['best_step']:>9}  "
            f"{_text(val):>8}  {_text(tests.get(i)):>8}  {settings}"
        )
    return lines


def _model_lines(meta: dict[str, Any]) -> list[str]:
    """The model settings, vocabulary and parameter count of a checkpoint's metadata."""
    import jax

    from lstm_jax.config import model_config_from_settings
    from lstm_jax.metrics import flag_lines
    from lstm_jax.models import CharLSTM, count_params, init_params

    model_config = model_config_from_settings(meta["settings"])
    model = CharLSTM(model_config, len(meta["vocab"]))
    shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    lines = [
        f"model: {' '.join(flag_lines(model_config).splitlines())}",
        f"vocabulary: {len(meta['vocab'])} characters",
        f"parameters: {count_params(shapes):,}",
    ]
    started_from = meta.get("config", {}).get("init", {}).get("init_from")
    if started_from:
        lines.append(f"fine-tuned from: {started_from}")
    return lines


if __name__ == "__main__":
    cli.run(main, [InfoOptions])
