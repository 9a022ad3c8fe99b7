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

from lstm_jax import bookkeeping, parallel, population
from lstm_jax.bookkeeping import Progress
from lstm_jax.checkpoint import room_needed
from lstm_jax.config import Config
from lstm_jax.data import RunData, load_run_data
from lstm_jax.errors import UsageError, UserError
from lstm_jax.evaluate import evaluate, evaluate_members, test_best_checkpoint
from lstm_jax.finetune import init_state, vocab_builder
from lstm_jax.generate import sample_for_log
from lstm_jax.metrics import MetricsFile, Timer, bpc_text, every, format_duration
from lstm_jax.models import count_params
from lstm_jax.resume import open_checkpoints, resume_state
from lstm_jax.run import Run, TrainResult
from lstm_jax.steps import bits_per_char, learning_rate_schedule, total_steps
from lstm_jax.stop import StopSignal
from lstm_jax.workdir import claim


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
    model, state, layout, hparams, checkpoint_bytes = _model_and_state(
        config, data, members, devices, num_steps, log
    )

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
        run = Run(config, devices, data, model, state, None, progress, timer, checkpoints)
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
        member_rows = bookkeeping.write_results(run)
        checkpoints.close()
        metrics_file.close()
    return run.result(step, stopped_by, member_rows)


def _model_and_state(config: Config, data: RunData, members, devices, num_steps: int, log):
    """(model, state, population layout, members' Hyperparams, checkpoint bytes); the state
    replicated over the devices for a single run, stacked on the host for a population (laid
    out over the devices once resumed)."""
    layout, hparams = None, None
    if members is None:
        model, state = init_state(config, data.vocab, num_steps, log)  # --init_from: its params.
        checkpoint_bytes = room_needed(state)
        state = parallel.replicate(state, devices)
    else:
        layout = parallel.PopulationLayout(
            len(members), tuple(devices), config.population.member_loop
        )
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
    return model, state, layout, hparams, checkpoint_bytes


def _train(run: Run) -> tuple[int, str | None]:
    """The steps, with logging, evaluation, checkpoints and samples at their periods; returns
    the last step and what stopped the run early (None if nothing did)."""
    loop, batcher = run.config.loop, run.data.batcher
    if run.layout is None:
        p_train_step = parallel.train_step(run.devices)
        p_eval_step = parallel.eval_step(run.model.apply, run.devices)
    else:  # Every member in one step; the member's settings as traced values.
        p_train_step = functools.partial(
            bookkeeping.with_hparams, run.layout.train_step(), run.hparams
        )
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
                run.log(f"First step (compilation included) took {run.timer.since_start():.1f} s.")
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
    progress = Progress.from_meta(meta)
    timer = Timer(meta.get("wall_seconds", meta["train_seconds"]), meta["train_seconds"])
    log(f"Resuming from step {meta['step']} in {checkpoints.directory}.")
    member_progress = None
    if members:
        member_progress = [Progress.from_meta(m) for m in meta["members"]]
    return state, carry, progress, timer, member_progress


def _flush(run: Run, step: int, pending: list) -> dict[str, float]:
    """Fetch the metrics of the steps since the last flush (one host sync) and summarise them;
    stop on a non-finite loss, naming the steps and where the next run resumes."""
    fetched = jax.device_get(pending)
    train, who = bookkeeping.summarise_training(run, fetched)
    if not math.isfinite(train["loss"]):
        raise UserError(
            f"The training loss{who} became non-finite between steps {step - len(pending) + 1} "
            f"and {step}; checkpoints kept as they were ({run.checkpoints.next_resume()}). "
            "Lower --learning_rate or --grad_clip and run again (with --restart if it "
            "diverged early)."
        )
    pending.clear()
    return train


def _log_training(run: Run, step: int, steps_in_window: int, train: dict[str, float]) -> None:
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


def _validate(run: Run, p_eval_step: Callable, zero_carry: Any) -> dict[str, float]:
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


def _record_validation(run: Run, step: int, losses: dict[str, Any]) -> None:
    if run.layout is not None:
        return bookkeeping.record_member_validation(run, step, losses)
    progress = run.progress
    progress.record(losses, step)
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


def _save(run: Run, step: int) -> None:
    progress = run.progress
    selected, selected_loss = progress.selected()
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
    state = run.state
    if run.layout is not None:  # Every member's own bookkeeping, in the member's order.
        meta["members"] = bookkeeping.member_checkpoint_meta(run)
        state = run.layout.state_to_host(run.state)
    # Saved whole ([global_batch, ...]) so any device or process count can resume from it.
    host_carry = parallel.gather_rows(run.carry_to_host())
    run.checkpoints.save(
        step,
        state=parallel.to_global(state, run.devices),
        carry=host_carry,
        meta=meta,
        val_loss=selected_loss,
    )


def _record_test(run: Run) -> None:
    """Score the best checkpoint's model on the test text, once, and record it."""
    if run.layout is not None:
        return bookkeeping.record_member_tests(run)
    tested = test_best_checkpoint(run.checkpoints, run.model, run.state.params, run.data.split.test)
    if tested is None:
        return
    step, which, run.progress.test_loss = tested
    bpc = bits_per_char(run.progress.test_loss)
    run.log(
        f"Test: {bpc:.4f} bpc ({run.progress.test_loss:.4f} nats/char) over the "
        f"{len(run.data.split.test) - 1:,} predicted test characters (all but the first) read as "
        f"one stream, by the best checkpoint by validation (step {step}, "
        f"{'EMA ' if which == 'ema_params' else ''}parameters)."
    )
    run.metrics_file.write(step=step, test_loss=run.progress.test_loss, test_bpc=bpc, test_of=which)


def _log_end(run: Run, stopped_by: str | None, step: int) -> None:
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


def _sample_for_log(run: Run, step: int) -> str:
    """A short sample for the log and TensorBoard (see `generate.sample_for_log`)."""
    if jax.process_index() != 0:  # Sampling is local work; the other processes skip it.
        return ""
    params = run.state.params
    if run.layout is not None:  # The best member's, by validation so far.
        params = bookkeeping.best_member_params(run)
    params = jax.device_put(params, jax.local_devices()[0])
    config = run.config
    text = sample_for_log(
        run.model, params, run.data.vocab, run.data.split.val, config.sample, config.data.seed
    )
    run.metrics_file.write_text("sample", text, step)
    return text


def _stop_at_once(run: Run) -> str:
    """Before a second Ctrl-C ends the process: give the workdir back, say where to resume."""
    run.held.release()
    resumes = run.checkpoints.next_resume()
    return f"Stopped at once by a second Ctrl-C (a save in flight is abandoned); {resumes}."


def _silent(message: str) -> None:
    """The log of processes other than 0: the job speaks once."""
