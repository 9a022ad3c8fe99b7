"""Training: the train state, the optimizer, the pure `train_step`/`eval_step`, and the loop.

The step functions know nothing about devices: a step that runs data parallel takes `axis_name`
and averages gradients and sums metrics over it; `lstm_jax.parallel` decides how it is mapped.
`train_and_evaluate(config)` owns the loop: data, resume, steps, validation, checkpoints,
progress, samples, and stopping cleanly on SIGTERM/SIGINT.

In a multi-process job (`lstm_jax.distributed`) every process runs this same loop on its own
rows of every batch; process 0 alone logs, samples and writes metrics, and all of them save.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax.training import train_state
from jax.experimental import multihost_utils

from lstm_jax import distributed
from lstm_jax.checkpoint import Checkpoints, abstract_like, checkpoint_dir, workdir_path
from lstm_jax.config import Config, complete_settings
from lstm_jax.data import Batcher, Vocab, eval_streams, load_corpus, split
from lstm_jax.errors import UsageError, UserError
from lstm_jax.metrics import MetricsFile
from lstm_jax.models import Carry, build_model, count_params, init_params

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the key that dropout masks are folded from (with the step)."""

    dropout_key: jax.Array


def learning_rate_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to 10% of the peak at `total_steps`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=0.1 * config.learning_rate,
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
            optax.constant_schedule(config.learning_rate),
        ],
        [max(warmup, 1)],
    )


def make_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, total_steps)
    if config.optimizer == "adamw":
        update = optax.adamw(schedule, weight_decay=config.weight_decay)
    else:
        update = optax.adam(schedule)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), update)
    return update


def create_train_state(
    model, params: Any, config: Config, total_steps: int, dropout_key: jax.Array
) -> TrainState:
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=make_optimizer(config, total_steps),
        dropout_key=dropout_key,
    )


def _reset_carry(carry: Carry, reset: jax.Array) -> Carry:
    return jax.tree.map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), carry)


def train_step(
    state: TrainState,
    batch: jax.Array,
    carry: Carry,
    reset: jax.Array,
    *,
    axis_name: str | None = None,
) -> tuple[TrainState, Carry, Metrics]:
    """One optimizer step on int32 `batch` [batch, seq_len + 1].

    `carry` is the LSTM state left by the previous step; `reset` (a boolean scalar) zeroes it
    first, at the start of an epoch or when batches are independent windows. Returns the new
    state, the carry to feed the next step, and metric sums (`loss_sum`, `count`) plus the global
    gradient norm.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    carry = _reset_carry(carry, reset)
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        new_carry, logits = state.apply_fn(
            {"params": params}, carry, inputs, deterministic=False, rngs={"dropout": dropout_key}
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return losses.mean(), (new_carry, losses.sum())

    (_, (new_carry, loss_sum)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss_sum": loss_sum, "count": jnp.asarray(targets.size, jnp.float32)}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.psum(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads), new_carry, metrics


def eval_step(
    params: Any,
    carry: Carry,
    inputs: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    apply_fn: Callable,
    axis_name: str | None = None,
) -> tuple[Carry, Metrics]:
    """Weighted loss sums over one chunk of the validation streams; returns the carry onwards."""
    new_carry, logits = apply_fn({"params": params}, carry, inputs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights
    metrics = {"loss_sum": losses.sum(), "count": weights.sum()}
    if axis_name is not None:
        metrics = jax.lax.psum(metrics, axis_name)
    return new_carry, metrics


def bits_per_char(loss_nats: float) -> float:
    return loss_nats / math.log(2)


# --- The training loop -----------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run hands back: for tests, notebooks and the command line."""

    step: int
    params: Any  # On the host, as numpy arrays.
    val_loss: float
    best_val_loss: float
    best_step: int
    train_losses: list[float]  # Mean loss (nats) of every logging window, in order.
    vocab: Vocab
    stopped_early: bool = False


class _StopSignal:
    """Turns SIGTERM/SIGINT into a request to stop after the step in flight (and save).

    A multi-process job must stop every process after the same step, or the next collective
    hangs. There the signals are left to JAX's preemption notifier (installed by
    `jax.distributed.initialize`; SIGTERM to any process) and `requested_at` asks it, every
    step, whether all processes have agreed on this step as the one to stop after.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}
        self._multiprocess = jax.process_count() > 1

    def requested_at(self, step: int) -> str | None:
        if self._multiprocess and multihost_utils.reached_preemption_sync_point(step):
            self.requested = "a preemption notice (SIGTERM)"
        return self.requested

    def __enter__(self):
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C stops at once.
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _bpc_text(loss_nats: float) -> str:
    return "-" if math.isnan(loss_nats) else f"{bits_per_char(loss_nats):.3f} bpc"


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _settings_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k} {saved.get(k)!r} (saved) vs {current.get(k)!r} (now)"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def train_and_evaluate(
    config: Config,
    *,
    devices: Sequence[jax.Device] | None = None,
    log: Callable[[str], None] = logging.info,
) -> TrainResult:
    """Train (or resume) the run in `config.workdir`, checkpointing and evaluating as it goes."""
    from lstm_jax import parallel  # It maps this module's steps over devices.

    # --- Devices and data ---
    devices = list(devices or jax.local_devices())
    num_devices = len(devices)
    if jax.process_count() > 1:
        if devices != jax.local_devices():
            raise UsageError("A multi-process job runs on all local devices of every process.")
        log = log if jax.process_index() == 0 else _silent
    config.validate(num_devices * jax.process_count())
    text, data_note = load_corpus(config)
    vocab = Vocab.from_text(text)
    train_ids, val_ids = split(vocab.encode(text), config.val_fraction)
    batcher = Batcher(
        train_ids, config.seq_len, config.global_batch, config.seed, config.carry_state
    )
    if len(val_ids) <= config.seq_len:
        raise UsageError(
            f"--seq_len={config.seq_len} is longer than the validation text ({len(val_ids)} "
            "characters); lower --seq_len or raise --val_fraction."
        )
    process_rows = config.global_batch // jax.process_count()
    rows = slice(jax.process_index() * process_rows, (jax.process_index() + 1) * process_rows)
    eval_inputs, eval_targets, eval_weights = (
        a[:, rows] for a in eval_streams(val_ids, config.global_batch, config.seq_len)
    )
    total_steps = config.num_steps or max(1, math.ceil(config.num_epochs * batcher.steps_per_epoch))

    # --- Model and state ---
    model = build_model(config, vocab.size)
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    params = init_params(model, init_key)
    state = create_train_state(model, params, config, total_steps, dropout_key)
    state = parallel.replicate(state, devices)
    carry = model.initialize_carry(process_rows)
    log(
        f"{data_note}; vocabulary {vocab.size}; train {len(train_ids):,} / validation "
        f"{len(val_ids):,} characters; {count_params(params):,} parameters; "
        f"{batcher.steps_per_epoch} steps per epoch; {num_devices} local device(s) "
        f"({devices[0].platform}), {jax.process_count()} process(es)"
    )

    # --- Resume ---
    workdir = workdir_path(config.workdir)
    checkpoints = _open_checkpoints(config, workdir, log)
    settings = config.run_settings()
    start_step, best_val_loss, best_step, train_seconds = 0, math.inf, -1, 0.0
    earlier_wall_seconds = 0.0  # Of the runs this one resumes.
    # Restore targets fit this run's devices, whatever the saving run had: the state is
    # replicated over every device of the job, the carry is the whole global batch, on the host.
    replicated = parallel.global_replicated_sharding(devices)
    abstract = {
        "params": abstract_like(state.params, replicated),
        "opt_state": abstract_like(state.opt_state, replicated),
        "carry": jax.tree.map(
            lambda c: np.zeros(c.shape, c.dtype), model.initialize_carry(config.global_batch)
        ),
    }
    resumed = _restore_latest_usable(checkpoints, abstract, settings, vocab, log)
    if resumed is not None:
        start_step, restored, meta = resumed
        state = state.replace(
            step=parallel.replicate(jnp.asarray(start_step, jnp.int32), devices),
            params=parallel.to_host_local(restored["params"], devices),
            opt_state=parallel.to_host_local(restored["opt_state"], devices),
        )
        carry = jax.tree.map(lambda c: np.asarray(c)[rows], restored["carry"])
        best_val_loss, best_step = meta["best_val_loss"], meta["best_step"]
        train_seconds = meta["train_seconds"]
        earlier_wall_seconds = meta.get("wall_seconds", train_seconds)
        log(f"Resuming from step {start_step} in {checkpoints.directory}.")

    # --- Steps ---
    p_train_step = parallel.train_step(devices)
    p_eval_step = parallel.eval_step(model.apply, devices)
    carry = jax.tree.map(lambda c: parallel.shard(np.asarray(c), num_devices), carry)

    def evaluate(params) -> float:
        eval_carry = jax.tree.map(
            lambda c: np.zeros((num_devices, process_rows // num_devices, *c.shape[2:]), c.dtype),
            carry,
        )
        sums = []
        for chunk in range(eval_inputs.shape[0]):
            eval_carry, chunk_sums = p_eval_step(
                params,
                eval_carry,
                parallel.shard(eval_inputs[chunk], num_devices),
                parallel.shard(eval_targets[chunk], num_devices),
                parallel.shard(eval_weights[chunk], num_devices),
            )
            sums.append(chunk_sums)
        sums = jax.device_get(sums)
        return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)

    metrics_file = MetricsFile(workdir / "metrics.jsonl", tensorboard_dir=workdir)
    schedule = learning_rate_schedule(config, total_steps)
    pending: list[Metrics] = []
    train_losses: list[float] = []
    val_loss = math.nan
    chars_per_step = config.global_batch * config.seq_len
    stopped_by = None
    # What `python -m lstm_jax.report` labels the run with; a resumed run drops later records.
    metrics_file.write(
        step=start_step,
        cell=config.cell,
        parameters=count_params(params),
        chars_per_step=chars_per_step,
    )
    run_start = time.perf_counter()

    def wall_seconds() -> float:
        """Wall-clock time of the run so far, compiling and evaluating included, resumes summed."""
        return earlier_wall_seconds + time.perf_counter() - run_start

    def flush_metrics(step: int) -> tuple[float, float]:
        """Fetch the metrics since the last flush (one host sync) and stop on a non-finite loss."""
        fetched = jax.device_get(pending)
        pending.clear()
        loss = sum(float(m["loss_sum"]) for m in fetched) / sum(float(m["count"]) for m in fetched)
        if not math.isfinite(loss):
            raise UserError(
                f"The training loss became non-finite between steps {step - len(fetched) + 1} "
                f"and {step}; kept the last good checkpoint (step {checkpoints.latest_step()}). "
                "Lower --learning_rate or --grad_clip and run again (with --restart if it "
                "diverged early)."
            )
        train_losses.append(loss)
        return loss, float(np.mean([float(m["grad_norm"]) for m in fetched]))

    def save(step: int, val_loss: float) -> None:
        meta = {
            "vocab": vocab.chars,
            "settings": settings,
            "config": dataclasses.asdict(config),
            "step": step,
            "val_loss": val_loss,
            "val_bpc": bits_per_char(val_loss),
            "best_val_loss": best_val_loss,
            "best_step": best_step,
            "train_seconds": train_seconds,
            "wall_seconds": wall_seconds(),
        }
        # Saved whole ([global_batch, ...]) so any device or process count can resume from it.
        host_carry = parallel.gather_rows(jax.tree.map(parallel.unshard, carry))
        checkpoints.save(
            step,
            params=parallel.to_global(state.params, devices),
            opt_state=parallel.to_global(state.opt_state, devices),
            carry=host_carry,
            meta=meta,
            val_loss=val_loss,
        )

    def sample_for_log(params) -> str:
        if jax.process_index() != 0:  # Sampling is local work; the other processes skip it.
            return ""
        return _sample(model, params, vocab, val_ids, config, devices)

    # --- Loop ---
    step = start_step
    window_start, window_first_step, window_excluded = time.perf_counter(), step, 0.0
    with _StopSignal() as stop:
        while step < total_steps:
            batch = parallel.shard(batcher.batch(step, rows), num_devices)
            state, carry, metrics = p_train_step(
                state, batch, carry, batcher.starts_new_epoch(step)
            )
            pending.append(metrics)
            step += 1
            if step == start_step + 1:
                # The first call compiles; time it apart so chars/s measures training only.
                jax.block_until_ready(metrics)
                compile_seconds = time.perf_counter() - window_start
                log(f"First step (compilation included) took {compile_seconds:.1f} s.")
                window_start = time.perf_counter()
            last = step == total_steps
            stopped_by = stopped_by or stop.requested_at(step)
            if step % config.log_every == 0 or last or stopped_by:
                loss, grad_norm = flush_metrics(step)
                seconds = time.perf_counter() - window_start - window_excluded
                train_seconds += seconds
                chars_per_second = (step - window_first_step) * chars_per_step / seconds
                eta = (total_steps - step) * chars_per_step / chars_per_second
                log(
                    f"step {step}/{total_steps} | train {bits_per_char(loss):.3f} bpc | "
                    f"val {_bpc_text(val_loss)} | {chars_per_second:,.0f} chars/s | "
                    f"ETA {_format_duration(eta)}"
                )
                metrics_file.write(
                    step=step,
                    wall_seconds=wall_seconds(),
                    train_seconds=train_seconds,
                    train_loss=loss,
                    train_bpc=bits_per_char(loss),
                    chars_per_second=chars_per_second,
                    learning_rate=float(schedule(step - 1)),
                    grad_norm=grad_norm,
                )
                window_start, window_first_step, window_excluded = time.perf_counter(), step, 0.0
            checkpoint_now = step % config.checkpoint_every == 0 or last or stopped_by
            evaluate_now = checkpoint_now or step % config.eval_every == 0
            sample_now = config.sample_every and step % config.sample_every == 0 and not last
            if evaluate_now or sample_now:
                # Steps run asynchronously: finish them before timing the side work.
                jax.block_until_ready(state.params)
            side_work_start = time.perf_counter()
            if evaluate_now:
                if pending:  # Never save (or evaluate) a state whose loss was not checked.
                    flush_metrics(step)
                val_loss = evaluate(state.params)
                if val_loss < best_val_loss:
                    best_val_loss, best_step = val_loss, step
                log(
                    f"step {step}: validation {bits_per_char(val_loss):.4f} bpc "
                    f"({val_loss:.4f} nats/char); best {bits_per_char(best_val_loss):.4f} bpc "
                    f"at step {best_step}"
                )
                metrics_file.write(
                    step=step,
                    wall_seconds=wall_seconds(),
                    train_seconds=train_seconds,
                    val_loss=val_loss,
                    val_bpc=bits_per_char(val_loss),
                )
                if checkpoint_now:
                    save(step, val_loss)
            if sample_now:
                log(f"sample at step {step}:\n{sample_for_log(state.params)}")
            window_excluded += time.perf_counter() - side_work_start
            if stopped_by:
                break
    checkpoints.wait()
    if stopped_by:
        log(
            f"Stopped by {stopped_by} after step {step}; saved a checkpoint. Run the same command "
            "again to resume."
        )
    elif step > start_step or start_step == 0:
        log(f"Finished {total_steps} steps; sample:\n{sample_for_log(state.params)}")
    else:
        log(f"{checkpoints.directory} already holds the final step {step}; nothing to train.")
    checkpoints.close()
    metrics_file.close()
    return TrainResult(
        step=step,
        params=jax.device_get(state.params),
        val_loss=val_loss,
        best_val_loss=best_val_loss,
        best_step=best_step,
        train_losses=train_losses,
        vocab=vocab,
        stopped_early=stopped_by is not None,
    )


def _restore_latest_usable(
    checkpoints: Checkpoints, abstract: dict[str, Any], settings: dict[str, Any], vocab: Vocab, log
) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint that reads back whole, after checking it is this run's model.

    Unfinished saves are removed with a warning; a checkpoint that fails to read (truncated or
    missing files) is set aside with a warning and the next older one is tried.
    """
    for folder in checkpoints.incomplete():
        logging.warning(
            "Removing the unfinished save %s (the process died while writing it).", folder
        )
        if jax.process_index() == 0:
            folder.rmtree(missing_ok=True)
    steps = sorted(checkpoints.steps(), reverse=True)
    for step in steps:
        try:
            meta = checkpoints.read_meta(step)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not usable.
            _skip_unreadable(checkpoints, step, e)
            continue
        differences = _settings_mismatch(complete_settings(meta["settings"]), settings)
        if meta["vocab"] != vocab.chars:
            differences.append(
                f"vocabulary of {len(meta['vocab'])} characters (saved) vs {vocab.size} (now)"
            )
        if differences:
            raise UserError(
                f"{checkpoints.directory.parent} holds a run with other settings: "
                f"{'; '.join(differences)}. Use a new --workdir, or --restart to set the old "
                "checkpoints aside."
            )
        try:
            return step, checkpoints.restore(step, abstract), meta
        except Exception as e:  # noqa: BLE001
            if "structures do not match" in str(e):  # Not damage: another model's tree.
                raise UserError(
                    f"Checkpoint {checkpoints.directory}/{step} holds parameters or optimizer "
                    "state of another shape; use a new --workdir, or --restart to set it aside."
                ) from None
            _skip_unreadable(checkpoints, step, e)
    if steps:
        raise UserError(
            f"No checkpoint in {checkpoints.directory} could be read (steps {steps} were set "
            "aside); pass --restart to train from scratch."
        )
    return None


def _skip_unreadable(checkpoints: Checkpoints, step: int, error: Exception) -> None:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    aside = checkpoints.set_aside(step) if jax.process_index() == 0 else None
    logging.warning(
        "Checkpoint %s/%d is unreadable (%s); moved it to %s and trying an older one.",
        checkpoints.directory,
        step,
        reason,
        aside,
    )


def _open_checkpoints(config: Config, workdir: epath.Path, log) -> Checkpoints:
    if config.restart:
        directory = checkpoint_dir(workdir)
        if directory.exists() and jax.process_index() == 0:
            aside = directory.with_name(f"checkpoints.discarded-{time.strftime('%Y%m%d-%H%M%S')}")
            directory.rename(aside)
            log(f"--restart: moved the old checkpoints to {aside}.")
        # No process may list the folder before process 0 has moved it.
        distributed.barrier("lstm_jax.restart")
    return Checkpoints(workdir, keep=config.keep_checkpoints)


def _silent(message: str) -> None:
    """The log of processes other than 0: the job speaks once."""


def _sample(model, params, vocab: Vocab, val_ids, config: Config, devices) -> str:
    """A short sample for the log, from the prompt or a random window of the validation text."""
    from lstm_jax.sample import sample_text

    prompt = config.sample_prompt
    if not prompt:
        start = np.random.default_rng(config.seed).integers(0, max(len(val_ids) - 100, 1))
        prompt = vocab.decode(val_ids[start : start + 100])
    params = jax.device_put(params, devices[0])
    (text,) = sample_text(
        model,
        params,
        vocab,
        prompt,
        length=config.sample_length,
        temperature=config.sample_temperature,
        seed=config.seed,
        unknown="skip",
    )
    return f"{prompt}|{text}"
