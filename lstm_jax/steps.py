"""The pure, device-agnostic parts of training: the train state, the optimizer and its schedule,
`init_state`, and the `train_step` / `eval_step` functions.

The steps know nothing about devices: a step that runs data parallel takes `axis_name` and
averages gradients and sums metrics over it; `lstm_jax.parallel` decides how it is mapped.
A step returns its metrics as sums plus a `count` (characters), so the loop summarises any new
metric generically: add `"name_sum": value * count` in the step and `name` appears in the log
and in metrics.jsonl.

A new training idea is a `TrainState` field plus a few lines in the step, as the EMA of the
parameters is (`ema_params`, updated in `TrainState.apply_gradients`); the checkpoint saves the
whole state, so it is saved and resumed with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from lstm_jax.config import Config, OptimConfig
from lstm_jax.models import Carry, CharLSTM, build_model, init_params

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the key that dropout masks are folded from (with the step), and
    the exponential moving average of the parameters (None when `ema_decay` is 0).

    The key is kept as raw key data (uint32), so the whole state is plain arrays: one
    checkpoint item, EMA included.
    """

    dropout_key: jax.Array
    ema_params: Any = None
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

    def apply_gradients(
        self, *, grads: Any, hparams: Hyperparams | None = None, **kwargs: Any
    ) -> TrainState:
        """The optimizer step, then the average follows the new parameters. With `hparams` (a
        population member's), its optimizer and EMA decay instead of the run's constants."""
        if hparams is None:
            new = super().apply_gradients(grads=grads, **kwargs)
        else:  # The same update, through the member's optimizer (same state tree).
            tx = hparams.optimizer()
            new = self.replace(tx=tx).apply_gradients(grads=grads, **kwargs).replace(tx=self.tx)
        if self.ema_params is None:
            return new
        ema_decay = self.ema_decay if hparams is None else hparams.ema_decay
        # Warmed up as in TensorFlow's ExponentialMovingAverage(num_updates): early parameters,
        # far from the final ones, fade fast.
        decay = jnp.minimum(ema_decay, (1.0 + self.step) / (10.0 + self.step))
        ema = optax.incremental_update(new.params, self.ema_params, 1.0 - decay)
        return new.replace(ema_params=ema)


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to 10% of the peak at `total_steps`."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=optim.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=0.1 * optim.learning_rate,
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, optim.learning_rate, max(warmup, 1)),
            optax.constant_schedule(optim.learning_rate),
        ],
        [max(warmup, 1)],
    )


# The settings a population's members may differ in (`lstm_jax.population`): none of them changes
# a shape or the program, so one jitted step serves every member, with these as traced values.
OPTIMIZER_HPARAMS = ("learning_rate", "weight_decay", "warmup_steps", "grad_clip", "ema_decay")
RATE_HPARAMS = ("dropout", "weight_drop", "embed_dropout", "input_dropout")


@flax.struct.dataclass
class Hyperparams:
    """One population member's varying settings as arrays (stacked: one row per member), and
    the run's constants that shape their use (`schedule`, `optimizer`, `total_steps`, ...).

    The optimizer is rebuilt from them inside the step (`optimizer()`): Optax's transformations
    take traced scalars, and the member's optimizer state is then the very tree a single run
    keeps, so a member restores, exports and compares as one run. (`optax.inject_hyperparams`
    would wrap that tree in its own state.) The schedule is written out here because Optax's
    schedule builders branch in Python on their arguments; its arithmetic is theirs, step for
    step, so a member computes what a single run with its settings computes.
    """

    learning_rate: jax.Array
    weight_decay: jax.Array
    warmup: jax.Array  # int32: min(warmup_steps, total_steps - 1), as the run's schedule takes.
    decay_steps: jax.Array  # float32: the cosine's length after warm-up.
    alpha: jax.Array  # float32: the cosine's end as a fraction of the peak...
    one_minus_alpha: jax.Array  # ...and 1 minus it, rounded once from float64 as Optax's is.
    grad_clip: jax.Array
    ema_decay: jax.Array
    keep: dict[str, jax.Array]  # Keep probabilities, 1 - rate, of the dropouts in RATE_HPARAMS.
    schedule: str = flax.struct.field(pytree_node=False, default="cosine")
    optimizer_name: str = flax.struct.field(pytree_node=False, default="adamw")
    clip: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def stack(cls, optims: list[OptimConfig], regs: list[Any], total_steps: int) -> Hyperparams:
        """The members' settings, one row each, computed on the host in float64 and rounded to
        float32 once, as a Python constant is in a single run's step."""

        def column(values, dtype=np.float32):
            return np.asarray(values, np.float64).astype(dtype)

        warmups = [min(o.warmup_steps, max(total_steps - 1, 0)) for o in optims]
        first = optims[0]
        return cls(
            learning_rate=column([o.learning_rate for o in optims]),
            weight_decay=column([o.weight_decay for o in optims]),
            warmup=np.asarray(warmups if first.schedule == "cosine" else
                              [max(w, 1) for w in warmups], np.int32),  # fmt: skip
            decay_steps=column([max(total_steps, w + 1) - w for w in warmups]),
            alpha=column([_alpha(o) for o in optims]),
            one_minus_alpha=column([1 - _alpha(o) for o in optims]),
            grad_clip=column([o.grad_clip for o in optims]),
            ema_decay=column([o.ema_decay for o in optims]),
            keep={name: column([1.0 - getattr(r, name) for r in regs]) for name in RATE_HPARAMS},
            schedule=first.schedule,
            optimizer_name=first.optimizer,
            clip=first.grad_clip > 0,
        )

    def learning_rate_at(self, count: jax.Array) -> jax.Array:
        """`learning_rate_schedule`'s value at `count`, from traced settings."""
        peak, warmup = self.learning_rate, self.warmup
        # optax.polynomial_schedule(0, peak, power=1, transition_steps=warmup).
        ramp_count = jnp.clip(count, 0, warmup)
        ramp = (0.0 - peak) * (1 - ramp_count / warmup) ** 1 + peak
        if self.schedule == "cosine":  # optax.cosine_decay_schedule, after the warm-up.
            after = jnp.minimum(count - warmup, self.decay_steps)
            cosine = 0.5 * (1 + jnp.cos(jnp.pi * after / self.decay_steps))
            rest = peak * (self.one_minus_alpha * cosine**1.0 + self.alpha)
            # Without a warm-up Optax's ramp is the constant 0 and is never selected.
            return jnp.where(count < warmup, ramp, rest)
        return jnp.where(count < warmup, ramp, peak)  # optax.join_schedules at max(warmup, 1).

    def optimizer(self) -> optax.GradientTransformation:
        """`make_optimizer`'s optimizer, with this member's traced settings."""
        if self.optimizer_name == "adamw":
            update = optax.adamw(self.learning_rate_at, weight_decay=self.weight_decay)
        else:
            update = optax.adam(self.learning_rate_at)
        if self.clip:
            return optax.chain(optax.clip_by_global_norm(self.grad_clip), update)
        return update


def _alpha(optim: OptimConfig) -> float:
    """The cosine's end (10% of the peak) over the peak, in float64 as Optax computes it."""
    return (0.1 * optim.learning_rate) / optim.learning_rate


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim, total_steps)
    if optim.optimizer == "adamw":
        update = optax.adamw(schedule, weight_decay=optim.weight_decay)
    else:
        update = optax.adam(schedule)
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), update)
    return update


def create_train_state(
    model: CharLSTM, params: Any, optim: OptimConfig, total_steps: int, dropout_key: jax.Array
) -> TrainState:
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=make_optimizer(optim, total_steps),
        dropout_key=jax.random.key_data(dropout_key),
        ema_params=params if optim.ema_decay > 0 else None,
        ema_decay=optim.ema_decay,
    )


def init_state(config: Config, vocab_size: int, total_steps: int) -> tuple[CharLSTM, TrainState]:
    """The model and its fresh train state, from the run's seed: the one way a run starts."""
    model = build_model(config, vocab_size)
    init_key, dropout_key = jax.random.split(jax.random.key(config.data.seed))
    params = init_params(model, init_key)
    return model, create_train_state(model, params, config.optim, total_steps, dropout_key)


def total_steps(config: Config, steps_per_epoch: int) -> int:
    """--num_steps, or --num_epochs passes over the text (a fraction rounds up)."""
    return config.optim.num_steps or max(1, math.ceil(config.optim.num_epochs * steps_per_epoch))


def reset_carry(carry: Carry, reset: jax.Array) -> Carry:
    return jax.tree.map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), carry)


def train_step(
    state: TrainState,
    batch: jax.Array,
    carry: Carry,
    reset: jax.Array,
    hparams: Hyperparams | None = None,
    *,
    axis_name: str | None = None,
) -> tuple[TrainState, Carry, Metrics]:
    """One optimizer step on int32 `batch` [batch, seq_len + 1].

    `carry` is the recurrent state left by the previous step; `reset` (a boolean scalar) zeroes
    it first, at the start of an epoch or when batches are independent windows. `hparams`: a
    population member's settings (None: the run's own, as constants). Returns the new state,
    the carry to feed the next step, and metric sums with their `count`.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    carry = reset_carry(carry, reset)
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))

    keep = None if hparams is None else {"keep": hparams.keep}

    def loss_fn(params):
        new_carry, logits = state.apply_fn(
            {"params": params}, carry, inputs, deterministic=False, rngs={"dropout": dropout_key},
            **(keep or {}),
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return losses.mean(), (new_carry, losses.sum())

    (_, (new_carry, loss_sum)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss_sum": loss_sum, "count": jnp.asarray(targets.size, jnp.float32)}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.psum(metrics, axis_name)
    # Weighted by the count like every metric, so its summary is the mean over steps.
    metrics["grad_norm_sum"] = optax.tree.norm(grads) * metrics["count"]
    return state.apply_gradients(grads=grads, hparams=hparams), new_carry, metrics


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
    """Weighted loss sums over one chunk of the evaluation streams; returns the carry onwards."""
    new_carry, logits = apply_fn({"params": params}, carry, inputs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights
    metrics = {"loss_sum": losses.sum(), "count": weights.sum()}
    if axis_name is not None:
        metrics = jax.lax.psum(metrics, axis_name)
    return new_carry, metrics


def bits_per_char(loss_nats: float) -> float:
    return loss_nats / math.log(2)
