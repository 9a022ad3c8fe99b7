"""The training loop: data, resume, steps, validation, checkpoints, progress, samples, and
stopping cleanly on SIGTERM/SIGINT.

`train_and_evaluate(config)` reads as named sections. The maths lives elsewhere: the pure steps
in `lstm_jax.steps`, how they map over devices in `lstm_jax.parallel`, scoring a text in
`lstm_jax.evaluate`, saving and resuming in `lstm_jax.checkpoint`.

In a multi-process job (`lstm_jax.distributed`) every process runs this same loop on its own
rows of every batch; process 0 alone logs, samples and writes metrics, and all of them save.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from lstm_jax import parallel, population
from lstm_jax.checkpoint import room_needed
from lstm_jax.config import Config
from lstm_jax.data import RunData, Vocab, load_run_data
from lstm_jax.errors import UsageError, UserError
from lstm_jax.evaluate import evaluate, evaluate_members, test_best_checkpoint
from lstm_jax.finetune import init_state, vocab_builder
from lstm_jax.generate import sample_for_log
from lstm_jax.metrics import MetricsFile, Timer, bpc_text, every, format_duration, summarise
from lstm_jax.models import count_params
from lstm_jax.resume import open_checkpoints, resume_state
from lstm_jax.steps import bits_per_char, learning_rate_schedule, total_steps
from lstm_jax.stop import StopSignal
from lstm_jax.workdir import Claim, claim


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run hands back: for tests, notebooks and the command line."""

    step: int
    params: Any  # On the host, as numpy arrays.
    val_loss: float
    best_val_loss: float
    best_step: int
    test_loss: float  # Of the best checkpoint; NaN without a test part or a finished run.
    train_losses: list[float]  # Mean loss (nats) of every logging window, in order.
    vocab: Vocab
    stopped_early: bool = False
    # results.json's member rows: seed, grid settings, best step, val and test bpc. A
    # population's `params` and losses above are stacked / of its best member by validation.
    members: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Progress:
    """The loop's bookkeeping, saved in every checkpoint's metadata."""

    best_val_loss: float = math.inf
    best_step: int = -1
    best_params: str = "params"  # Which of the state's parameters: "params" or "ema_params".
    val_loss: float = math.nan  # The raw parameters'.
    ema_val_loss: float = math.nan
    test_loss: float = math.nan


@dataclasses.dataclass
class _Run:
    """Everything the loop's sections share: settings, data, the live state and its outputs."""

    config: Config
    devices: list[jax.Device]
    data: RunData
    model: Any
    state: Any
    carry: Any
    progress: Progress
    timer: Timer
    checkpoints: Any
    metrics_file: MetricsFile = None
    held: Claim = None
    num_steps: int = 0
    log: Callable[[str], None] = logging.info
    train_losses: list[float] = dataclasses.field(default_factory=list)
    # A population's (None for a single run): its members, their batchers, their traced
    # settings on the devices, how they map over the devices, and each member's bookkeeping.
    members: list[population.Member] | None = None
    batchers: list[Any] | None = None
    hparams: Any = None
    layout: parallel.PopulationLayout | None = None
    member_progress: list[Progress] | None = None

    def shard(self, x: np.ndarray) -> np.ndarray:
        if self.layout is not None:
            return self.layout.rows(x)
        return parallel.shard(x, len(self.devices))

    def batch(self, step: int) -> np.ndarray:
        if self.layout is None:
            return self.shard(self.data.batcher.batch(step, self.data.rows))
        rows = np.stack([b.batch(step, self.data.rows) for b in self.batchers])
        return self.layout.to_devices(rows)

    def carry_to_devices(self, carry: Any) -> Any:
        """The carry (this process's rows, [members, rows, ...] for a population) laid out."""
        to_devices = self.layout.to_devices if self.layout is not None else self.shard
        return jax.tree.map(lambda c: to_devices(np.asarray(c)), carry)

    def carry_to_host(self) -> Any:
        to_host = self.layout.to_host if self.layout is not None else parallel.unshard
        return jax.tree.map(to_host, self.carry)


def train_and_evaluate(
    config: Config,
    *,
    devices: Sequence[jax.Device] | None = None,
    log: Callable[[str], None] = logging.info,
    flagfile: str | None = None,
) -> TrainResult:
    """Train (or resume) the run in `config.loop.workdir`, checkpointing and evaluating.

    flagfile: the flags that reproduce the run, for `WORKDIR/flags.txt`. Nothing is written in
    the workdir (that file, metrics, checkpoints) before the settings, the data and the workdir
    (free, writable, the same model as its checkpoints) have been accepted.
    """
    # --- Devices and data ---
    devices = list(devices or jax.local_devices())
    if jax.process_count() > 1:
        if devices != jax.local_devices():
            raise UsageError("A multi-process job runs on all local devices of every process.")
        log = log if jax.process_index() == 0 else _silent
    config.validate(len(devices) * jax.process_count())
    members = population.members(config) if population.is_population(config) else None
    if members is not None:
        population.refuse_what_a_population_cannot_do(config, members)
    data = load_run_data(config.data, vocab_builder(config))
    num_steps = total_steps(config, data.batcher.steps_per_epoch)

    # --- Model and state ---
    layout, hparams = None, None
    if members is None:
        model, state = init_state(config, data.vocab, num_steps, log)  # --init_from: its params.
        checkpoint_bytes = room_needed(state)
        state = parallel.replicate(state, devices)
    else:  # Stacked on the host: laid out over the devices once resumed.
        layout = parallel.PopulationLayout(len(members), tuple(devices))
        population.refuse_beyond_memory(config, data.vocab.size, members, layout)
        model, state, hparams = population.init_states(members, data.vocab.size, num_steps)
        checkpoint_bytes = room_needed(state)
    log(
        f"{data.note}; vocabulary {data.vocab.size}; train {len(data.split.train):,} / "
        f"validation {len(data.split.val):,} / test {len(data.split.test):,} characters; "
        f"{count_params(state.params) // (len(members) if members else 1):,} "
        f"parameters; {data.batcher.steps_per_epoch} steps per epoch; {len(devices)} local "
        f"device(s) ({devices[0].platform}), {jax.process_count()} process(es)"
    )
    if members is not None:
        log(f"A population of {len(members)} runs in one job: {layout.describe()}.")

    # --- The workdir: this run's alone while it runs ---
    with claim(config.loop.workdir, needed_bytes=checkpoint_bytes) as held:
        # --- Resume ---
        loop = config.loop
        checkpoints = open_checkpoints(held.path, keep=loop.keep_checkpoints, restart=loop.restart,
                                       log=log, room_needed=checkpoint_bytes,
                                       members=len(members) if members else 1)  # fmt: skip
        state, carry, progress, timer, member_progress = _resume(
            config, model, state, checkpoints, data, devices, log, members
        )
        if flagfile is not None and jax.process_index() == 0:  # Accepted: now say how to rerun.
            (held.path / "flags.txt").write_text(flagfile)
        metrics_file = MetricsFile(
            held.path / "metrics.jsonl", tensorboard_dir=held.path, settings=config
        )
        run = _Run(config, devices, data, model, state, None, progress, timer, checkpoints)
        run.metrics_file, run.num_steps, run.log, run.held = metrics_file, num_steps, log, held
        if members is not None:
            run.members, run.layout, run.member_progress = members, layout, member_progress
            run.batchers = [dataclasses.replace(data.batcher, seed=m.seed) for m in members]
            run.state = layout.state_to_devices(state)
            run.hparams = layout.state_to_devices(hparams)
        run.carry = run.carry_to_devices(carry)
        # What `python -m lstm_jax.report` labels the run with; a resumed run drops later records.
        metrics_file.write(
            step=int(np.asarray(state.step).reshape(-1)[0]),
            cell=config.model.cell,
            parameters=count_params(state.params) // (len(members) if members else 1),
            **(population.start_record(members) if members else {}),
            chars_per_step=config.data.global_batch * config.data.seq_len,
        )

        # --- Train ---
        step, stopped_by = _train(run)
        checkpoints.wait()
        _log_end(run, stopped_by, step)
        if stopped_by is None:  # The test is of a finished run.
            _record_test(run)
        member_rows = _write_results(run)
        checkpoints.close()
        metrics_file.close()
    params = jax.device_get(run.state.params)
    if members is not None:  # [members, ...] whatever the layout.
        progress = run.member_progress[population.best_member(run.member_progress)]
        params = run.layout.state_to_host(params)
    return TrainResult(
        step=step,
        params=params,
        val_loss=progress.val_loss,
        best_val_loss=progress.best_val_loss,
        best_step=progress.best_step,
        test_loss=progress.test_loss,
        train_losses=run.train_losses,
        vocab=data.vocab,
        stopped_early=stopped_by is not None,
        members=member_rows,
    )


def _train(run: _Run) -> tuple[int, str | None]:
    """The steps, with logging, evaluation, checkpoints and samples at their periods; returns
    the last step and what stopped the run early (None if nothing did)."""
    loop, batcher = run.config.loop, run.data.batcher
    if run.layout is None:
        p_train_step = parallel.train_step(run.devices)
        p_eval_step = parallel.eval_step(run.model.apply, run.devices)
    else:  # Every member in one step; the member's settings as traced values.
        p_train_step = functools.partial(_with_hparams, run.layout.train_step(), run.hparams)
        p_eval_step = run.layout.eval_step(run.model.apply)
    zero_eval_carry = jax.tree.map(np.zeros_like, run.carry)
    start_step = step = int(np.asarray(run.state.step).reshape(-1)[0])
    window_first_step, pending, stopped_by = step, [], None
    with StopSignal(on_second_interrupt=lambda: _stop_at_once(run)) as stop:
        while step < run.num_steps:
            batch = run.batch(step)
            run.state, run.carry, metrics = p_train_step(
                run.state, batch, run.carry, batcher.starts_new_epoch(step)
            )
            run.checkpoints.check_saves()  # A failed background save stops the run here.
            pending.append(metrics)
            step += 1
            if step == start_step + 1:
                # The first call compiles; time it apart so chars/s measures training only.
                jax.block_until_ready(metrics)
                run.log(f"First step (compilation included) took {run.timer.wall_seconds():.1f} s.")
                run.timer.restart_window()
            stopped_by = stopped_by or stop.requested_at(step)
            last = step == run.num_steps or bool(stopped_by)
            if every(step, loop.log_every, last=last):
                _log_training(run, step, step - window_first_step, _flush(run, step, pending))
                window_first_step = step
            checkpoint_now = every(step, loop.checkpoint_every, last=last)
            evaluate_now = checkpoint_now or every(step, loop.eval_every)
            sample_now = every(step, loop.sample_every) and step != run.num_steps
            if evaluate_now or sample_now:
                # Steps run asynchronously: finish them before timing the side work.
                jax.block_until_ready(run.state.params)
            run.timer.pause()
            if evaluate_now:
                if pending:  # Never save (or evaluate) a state whose loss was not checked.
                    _flush(run, step, pending)
                _record_validation(run, step, _validate(run, p_eval_step, zero_eval_carry))
                if checkpoint_now:
                    _save(run, step)
            if sample_now:
                run.log(f"sample at step {step}:\n{_sample_for_log(run, step)}")
            run.timer.resume()
            if stopped_by:
                break
    return step, stopped_by


# --- Sections of the loop ----------------------------------------------------------------------


def _resume(config, model, state, checkpoints, data: RunData, devices, log, members=None):
    """The state, carry (this process's rows, on the host), progress, timer and (for a
    population) each member's progress to start from: fresh, or those of the newest usable
    checkpoint."""
    num_members = len(members) if members else None
    state, carry, meta = resume_state(
        checkpoints, config, model, state, data, devices, members=num_members
    )
    fresh_members = [Progress() for _ in members] if members else None
    if meta is None:
        return state, carry, Progress(), Timer(), fresh_members
    progress = Progress(meta["best_val_loss"], meta["best_step"], meta.get("best_params", "params"))
    timer = Timer(meta.get("wall_seconds", meta["train_seconds"]), meta["train_seconds"])
    log(f"Resuming from step {meta['step']} in {checkpoints.directory}.")
    member_progress = None
    if members:
        member_progress = [
            Progress(m["best_val_loss"], m["best_step"], m["best_params"]) for m in meta["members"]
        ]
    return state, carry, progress, timer, member_progress


def _with_hparams(step: Callable, hparams: Any, state, batch, carry, reset):
    """A population's step, called as a single run's is."""
    return step(state, batch, carry, reset, hparams)


def _flush(run: _Run, step: int, pending: list) -> dict[str, float]:
    """Fetch the metrics of the steps since the last flush (one host sync) and summarise them;
    stop on a non-finite loss, naming the steps and where the next run resumes."""
    fetched = jax.device_get(pending)
    if run.layout is None:
        train = summarise(fetched)
        who = ""
    else:  # Each member's means, then their mean over the members (with the spread).
        per_member = [
            summarise([{k: np.asarray(v).reshape(-1)[i] for k, v in m.items()} for m in fetched])
            for i in range(len(run.members))
        ]
        train = {k: float(np.mean([m[k] for m in per_member])) for k in per_member[0]}
        train["member_losses"] = [m["loss"] for m in per_member]
        diverged = [i for i, m in enumerate(per_member) if not math.isfinite(m["loss"])]
        who = f" of {run.members[diverged[0]].label()}" if diverged else ""
    if not math.isfinite(train["loss"]):
        raise UserError(
            f"The training loss{who} became non-finite between steps {step - len(pending) + 1} "
            f"and {step}; checkpoints kept as they were ({run.checkpoints.next_resume()}). "
            "Lower --learning_rate or --grad_clip and run again (with --restart if it "
            "diverged early)."
        )
    pending.clear()
    return train


def _log_training(run: _Run, step: int, steps_in_window: int, train: dict[str, float]) -> None:
    run.train_losses.append(train["loss"])
    member_losses = train.pop("member_losses", None)
    chars_per_step = run.config.data.global_batch * run.config.data.seq_len
    if member_losses is not None:  # Every member reads a batch a step.
        chars_per_step *= len(member_losses)
    chars_per_second = steps_in_window * chars_per_step / run.timer.window()
    eta = (run.num_steps - step) * chars_per_step / chars_per_second
    run.log(
        f"step {step}/{run.num_steps} | train {bits_per_char(train['loss']):.3f} bpc"
        f"{' (mean of the members)' if member_losses else ''} | "
        f"val {bpc_text(run.progress.val_loss)} | {chars_per_second:,.0f} chars/s | "
        f"ETA {format_duration(eta)}"
    )
    schedule = learning_rate_schedule(run.config.optim, run.num_steps)
    if member_losses is not None:
        train["member_train_bpc"] = [bits_per_char(loss) for loss in member_losses]
    run.metrics_file.write(
        step=step,
        wall_seconds=run.timer.wall_seconds(),
        train_seconds=run.timer.train_seconds,
        train_loss=train["loss"],
        train_bpc=bits_per_char(train["loss"]),
        chars_per_second=chars_per_second,
        learning_rate=float(schedule(step - 1)),
        **{name: value for name, value in train.items() if name != "loss"},
    )


def _validate(run: _Run, p_eval_step: Callable, zero_carry: Any) -> dict[str, float]:
    """Validation loss of the parameters, and of their moving average when there is one."""
    losses = {}
    for name in ("params", "ema_params"):
        params = getattr(run.state, name)
        if params is not None:
            streams = run.data.eval_streams
            if run.layout is None:
                losses[name] = evaluate(p_eval_step, params, streams, zero_carry, run.shard)
            else:  # One loss per member, [members].
                losses[name] = evaluate_members(
                    p_eval_step, params, streams, zero_carry, run.shard, len(run.members)
                )
    return losses


def _record_validation(run: _Run, step: int, losses: dict[str, Any]) -> None:
    if run.layout is not None:
        return _record_member_validation(run, step, losses)
    progress = run.progress
    progress.val_loss = losses["params"]
    progress.ema_val_loss = losses.get("ema_params", math.nan)
    selected = min(losses, key=losses.get)
    if losses[selected] < progress.best_val_loss:
        progress.best_val_loss, progress.best_step = losses[selected], step
        progress.best_params = selected
    ema = f", EMA {bpc_text(progress.ema_val_loss)}" if "ema_params" in losses else ""
    of_ema = " (EMA)" if progress.best_params == "ema_params" else ""
    run.log(
        f"step {step}: validation {bits_per_char(progress.val_loss):.4f} bpc "
        f"({progress.val_loss:.4f} nats/char){ema}; best "
        f"{bits_per_char(progress.best_val_loss):.4f} bpc at step {progress.best_step}{of_ema}"
    )
    ema_records = {}
    if "ema_params" in losses:
        ema_bpc = bits_per_char(progress.ema_val_loss)
        ema_records = dict(ema_val_loss=progress.ema_val_loss, ema_val_bpc=ema_bpc)
    run.metrics_file.write(
        step=step,
        wall_seconds=run.timer.wall_seconds(),
        train_seconds=run.timer.train_seconds,
        val_loss=progress.val_loss,
        val_bpc=bits_per_char(progress.val_loss),
        **ema_records,
    )



def _record_member_validation(run: _Run, step: int, losses: dict[str, np.ndarray]) -> None:
    """Each member's validation, bookkept as a single run's is; the log says the spread."""
    for i, progress in enumerate(run.member_progress):
        own = {name: float(member_losses[i]) for name, member_losses in losses.items()}
        progress.val_loss = own["params"]
        progress.ema_val_loss = own.get("ema_params", math.nan)
        selected = min(own, key=own.get)
        if own[selected] < progress.best_val_loss:
            progress.best_val_loss, progress.best_step = own[selected], step
            progress.best_params = selected
    best = population.best_member(run.member_progress)
    run.progress = run.member_progress[best]
    val_bpc = [bits_per_char(p.val_loss) for p in run.member_progress]
    run.log(
        f"step {step}: validation {np.mean(val_bpc):.4f} bpc, mean of {len(val_bpc)} members "
        f"({min(val_bpc):.4f} to {max(val_bpc):.4f}); best {run.members[best].label()}: "
        f"{bits_per_char(run.progress.best_val_loss):.4f} bpc at step {run.progress.best_step}"
    )
    records = {}
    if "ema_params" in losses:
        records["member_ema_val_bpc"] = [bits_per_char(p.ema_val_loss) for p in run.member_progress]
    run.metrics_file.write(
        step=step,
        wall_seconds=run.timer.wall_seconds(),
        train_seconds=run.timer.train_seconds,
        val_loss=float(np.mean([p.val_loss for p in run.member_progress])),
        val_bpc=float(np.mean(val_bpc)),
        member_val_bpc=val_bpc,
        **records,
    )


def _selected(progress: Progress) -> tuple[str, float]:
    """A checkpoint's model: its raw parameters, or their average where that is better."""
    if progress.ema_val_loss < progress.val_loss:  # False without an EMA (NaN).
        return "ema_params", progress.ema_val_loss
    return "params", progress.val_loss


def _save(run: _Run, step: int) -> None:
    progress = run.progress
    # This checkpoint's model: its raw parameters, or their average where that is better.
    ema_better = progress.ema_val_loss < progress.val_loss  # False without an EMA (NaN).
    selected, selected_loss = (
        ("ema_params", progress.ema_val_loss) if ema_better else ("params", progress.val_loss)
    )
    meta = {
        "vocab": run.data.vocab.chars,
        "settings": run.config.run_settings(),
        "config": dataclasses.asdict(run.config),
        "step": step,
        "val_loss": progress.val_loss,
        "val_bpc": bits_per_char(progress.val_loss),
        **({"ema_val_loss": progress.ema_val_loss} if run.state.ema_params is not None else {}),
        "best_val_loss": progress.best_val_loss,
        "best_step": progress.best_step,
        "best_params": progress.best_params,
        "selected": selected,
        "selected_val_loss": selected_loss,
        "train_seconds": run.timer.train_seconds,
        "wall_seconds": run.timer.wall_seconds(),
    }
    state, member_losses = run.state, None
    if run.layout is not None:  # Every member's own bookkeeping, in the member's order.
        meta["members"], member_losses = [], []
        for member, member_progress in zip(run.members, run.member_progress, strict=True):
            which, loss = _selected(member_progress)
            meta["members"].append({
                "seed": member.seed,
                "settings": member.settings,
                **dataclasses.asdict(member_progress),
                "selected": which,
                "selected_val_loss": loss,
            })  # fmt: skip
            member_losses.append(loss)
        state = run.layout.state_to_host(run.state)
    # Saved whole ([global_batch, ...]) so any device or process count can resume from it.
    host_carry = parallel.gather_rows(run.carry_to_host())
    run.checkpoints.save(
        step,
        state=parallel.to_global(state, run.devices),
        carry=host_carry,
        meta=meta,
        val_loss=selected_loss,
        member_val_losses=member_losses,
    )


def _record_test(run: _Run) -> None:
    """Score the best checkpoint's model on the test text, once, and record it."""
    if run.layout is not None:
        return _record_member_tests(run)
    tested = test_best_checkpoint(run.checkpoints, run.model, run.state.params, run.data.split.test)
    if tested is None:
        return
    step, which, run.progress.test_loss = tested
    bpc = bits_per_char(run.progress.test_loss)
    run.log(
        f"Test: {bpc:.4f} bpc ({run.progress.test_loss:.4f} nats/char) over the "
        f"{len(run.data.split.test) - 1:,} predicted test characters (all but the first) read as "
        f"one stream, by the best checkpoint by validation (step {step}, {'EMA ' if which == 'ema_params' else ''}parameters)."
    )
    run.metrics_file.write(step=step, test_loss=run.progress.test_loss, test_bpc=bpc, test_of=which)


def _record_member_tests(run: _Run) -> None:
    """Each member's best checkpoint (by its own validation) scored on the test text."""
    stacked_like = run.layout.state_to_host(run.state.params)
    for i, progress in enumerate(run.member_progress):
        tested = test_best_checkpoint(
            run.checkpoints, run.model, stacked_like, run.data.split.test, member=i
        )
        if tested is None:
            return
        step, which, progress.test_loss = tested
        run.metrics_file.write(
            step=step, member=i, test_loss=progress.test_loss,
            test_bpc=bits_per_char(progress.test_loss), test_of=which,
        )  # fmt: skip
    best = population.best_member(run.member_progress)
    run.progress = run.member_progress[best]
    test_bpc = [bits_per_char(p.test_loss) for p in run.member_progress]
    run.log(
        f"Test: {np.mean(test_bpc):.4f} bpc, mean of {len(test_bpc)} members ({min(test_bpc):.4f} "
        f"to {max(test_bpc):.4f}), each member's best checkpoint by its validation, over the "
        f"{len(run.data.split.test) - 1:,} predicted test characters (all but the first) read "
        "as one stream."
    )


def _write_results(run: _Run) -> list[dict[str, Any]]:
    """WORKDIR/results.json: one row per member (a single run is a population of one); at the
    end of a population run, its groups as a table, mean +/- std over the seeds."""
    members = run.members or [population.Member(0, run.config.data.seed, {}, run.config)]
    progress = run.member_progress or [run.progress]
    rows = []
    for member, p in zip(members, progress, strict=True):
        rows.append({
            "member": member.index,
            "seed": member.seed,
            "settings": member.settings,
            "best_step": p.best_step if p.best_step >= 0 else None,
            "val_bpc": _finite_or_none(bits_per_char(p.best_val_loss)),
            "test_bpc": _finite_or_none(bits_per_char(p.test_loss)),
        })  # fmt: skip
    if jax.process_index() != 0:
        return rows
    results = population.write_results(run.held.path, rows)
    if run.members is not None:
        run.log(
            "Results (results.json), mean +/- std over seeds:\n"
            + population.groups_table(results["groups"])
        )
    return rows


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _log_end(run: _Run, stopped_by: str | None, step: int) -> None:
    if stopped_by:
        run.log(
            f"Stopped by {stopped_by} after step {step}; saved a checkpoint. Run the same "
            "command again to resume."
        )
    elif run.train_losses:  # It trained at least one step.
        run.log(f"Finished {run.num_steps} steps; sample:\n{_sample_for_log(run, step)}")
    else:
        run.log(
            f"{run.checkpoints.directory} already holds the final step {step}; nothing to train."
        )


def _sample_for_log(run: _Run, step: int) -> str:
    """A short sample for the log and TensorBoard (see `generate.sample_for_log`)."""
    if jax.process_index() != 0:  # Sampling is local work; the other processes skip it.
        return ""
    params = run.state.params
    if run.layout is not None:  # The best member's, by validation so far.
        best = population.best_member(run.member_progress)
        params = jax.tree.map(lambda x: x[best], run.layout.state_to_host(params))
    params = jax.device_put(params, jax.local_devices()[0])
    config = run.config
    text = sample_for_log(
        run.model, params, run.data.vocab, run.data.split.val, config.sample, config.data.seed
    )
    run.metrics_file.write_text("sample", text, step)
    return text


def _stop_at_once(run: _Run) -> str:
    """Before a second Ctrl-C ends the process: give the workdir back, say where to resume."""
    run.held.release()
    resumes = run.checkpoints.next_resume()
    return f"Stopped at once by a second Ctrl-C (a save in flight is abandoned); {resumes}."


def _silent(message: str) -> None:
    """The log of processes other than 0: the job speaks once."""
