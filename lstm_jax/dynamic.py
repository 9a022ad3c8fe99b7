"""Dynamic evaluation (Krause et al., 2018): the model keeps learning from the text it scores.

First the gradient statistics: the RMS over some training batches of the gradient of the mean
loss, per parameter (`gradient_rms`). Then, left to right over the scored text, in segments of
`dynamic_segment` characters, each segment is scored with the current weights *before* they
learn from it, and then

    theta <- theta - lr * g / (rms + epsilon) + decay * rate * (theta_0 - theta)

with g the gradient of the segment's mean loss, theta_0 the trained weights, and
rate = rms / mean(rms) capped at 1 / decay (so the decay never overshoots theta_0): the update
rule of benkrause/dynamic-evaluation ("RMS" dynamic evaluation with a global prior). The state
is carried from segment to segment, so with lr = decay = 0 this is static evaluation.

Several streams (`num_streams`): the text is cut into that many contiguous pieces, each read
by its own copy of the weights (`jax.vmap`), in parallel; one stream is the paper's setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lstm_jax.config import setting
from lstm_jax.data import Batcher, eval_streams
from lstm_jax.models import CharLSTM
from lstm_jax.settings import NON_NEGATIVE, POSITIVE


@dataclasses.dataclass(frozen=True)
class DynamicConfig:
    """dynamic evaluation (--dynamic): the weights adapt to the text as it is scored"""

    dynamic_lr: float = setting(
        3e-5, "Dynamic evaluation's learning rate (on RMS-normalised gradients); tune it on "
        "validation (--split=val).", within=NON_NEGATIVE,
    )  # fmt: skip
    dynamic_decay: float = setting(
        2e-3, "Dynamic evaluation's decay of the adapted weights back towards the trained ones, "
        "per segment (scaled per parameter by its gradient RMS); 0: none.", within=NON_NEGATIVE,
    )  # fmt: skip
    dynamic_segment: int = setting(
        50, "Characters scored between two updates of dynamic evaluation.", within=POSITIVE
    )  # fmt: skip
    dynamic_epsilon: float = setting(
        2e-5, "Added to the gradient RMS before dividing by it.", within=NON_NEGATIVE
    )
    dynamic_stat_batches: int = setting(
        40, "Training batches (of the run's --global_batch x --seq_len) that the gradient RMS "
        "is measured on, from the start of the training text.", within=POSITIVE,
    )  # fmt: skip


def gradient_rms(model: CharLSTM, params: Any, batcher: Batcher, num_batches: int) -> Any:
    """Per parameter, the RMS of the gradient of the mean loss over the first `num_batches`
    training batches, read as training reads them (state carried, reset at epoch starts) but
    without dropout."""

    @jax.jit
    def gradients(params, carry, batch):
        def loss_fn(p):
            new_carry, logits = model.apply({"params": p}, carry, batch[:, :-1])
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
            return losses.mean(), new_carry

        grads, new_carry = jax.grad(loss_fn, has_aux=True)(params)
        return new_carry, grads

    zero = model.initialize_carry(batcher.global_batch)
    carry, mean_square = zero, jax.tree.map(jnp.zeros_like, params)
    for step in range(num_batches):
        if batcher.starts_new_epoch(step):
            carry = zero
        carry, grads = gradients(params, carry, batcher.batch(step))
        mean_square = jax.tree.map(lambda m, g: m + g * g / num_batches, mean_square, grads)
    return jax.tree.map(jnp.sqrt, mean_square)


def decay_rates(rms: Any, decay: float) -> Any:
    """rms / (the mean over parameter arrays of their mean rms), capped at 1 / decay."""
    leaves = jax.tree.leaves(rms)
    mean = sum(float(jnp.mean(r)) for r in leaves) / len(leaves)
    cap = 1.0 / decay if decay > 0 else np.inf
    return jax.tree.map(lambda r: jnp.minimum(r / mean, cap), rms)


def update(
    params: Any, grads: Any, params0: Any, rms: Any, rates: Any, lr, decay, epsilon
) -> Any:
    """One step of dynamic evaluation: the RMS-normalised SGD step plus the decay to params0."""
    return jax.tree.map(
        lambda p, g, p0, r, k: p - lr * g / (r + epsilon) + decay * k * (p0 - p),
        params, grads, params0, rms, rates,
    )  # fmt: skip


class DynamicEvaluator:
    """Dynamic evaluation of one model and its trained parameters; `score` may be called with
    other hyperparameters (a tuning sweep) without compiling again."""

    def __init__(self, model: CharLSTM, params: Any, rms: Any, epsilon: float = 2e-5):
        self.model, self.params, self.rms, self.epsilon = model, params, rms, epsilon
        self._pass = jax.jit(self._whole_pass)

    def score(
        self, ids: np.ndarray, *, lr: float, decay: float, segment: int, num_streams: int = 1
    ) -> tuple[float, int]:
        """(mean loss in nats per character, characters scored) over `ids`."""
        inputs, targets, weights = eval_streams(ids, num_streams, segment)
        rates = decay_rates(self.rms, decay)
        loss_sum, count = self._pass(
            self.params, self.rms, rates, inputs, targets, weights, lr, decay, self.epsilon
        )
        return float(loss_sum) / float(count), int(count)

    def _whole_pass(self, params0, rms, rates, inputs, targets, weights, lr, decay, epsilon):
        num_streams = inputs.shape[1]
        adapt = self._one_segment(params0, rms, rates, lr, decay, epsilon)
        if num_streams > 1:  # Each stream its own copy of the weights.
            adapt = jax.vmap(adapt)
            params = jax.tree.map(lambda p: jnp.broadcast_to(p, (num_streams, *p.shape)), params0)
            carry = jax.tree.map(lambda c: c[:, None], self.model.initialize_carry(num_streams))
        else:
            params, carry = params0, self.model.initialize_carry(1)
            inputs, targets, weights = inputs[:, 0], targets[:, 0], weights[:, 0]

        def body(state, chunk):
            params, carry, loss_sum = state
            params, carry, segment_sum = adapt(params, carry, *chunk)
            return (params, carry, loss_sum + segment_sum.sum()), None

        (_, _, loss_sum), _ = jax.lax.scan(
            body, (params, carry, jnp.zeros((), jnp.float32)), (inputs, targets, weights)
        )
        return loss_sum, weights.sum()

    def _one_segment(self, params0, rms, rates, lr, decay, epsilon) -> Callable:
        """(params, carry, inputs [T], targets [T], weights [T]) of one stream -> the params
        after learning from the segment, the carry after it, and its loss sum (scored first)."""
        apply = self.model.apply

        def adapt(params, carry, inputs, targets, weights):
            def loss_fn(p):
                new_carry, logits = apply({"params": p}, carry, inputs[None])
                losses = optax.softmax_cross_entropy_with_integer_labels(logits[0], targets)
                loss_sum = (losses * weights).sum()
                return loss_sum / jnp.maximum(weights.sum(), 1.0), (new_carry, loss_sum)

            (_, (new_carry, loss_sum)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            params = update(params, grads, params0, rms, rates, lr, decay, epsilon)
            return params, new_carry, loss_sum

        return adapt
