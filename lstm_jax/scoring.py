"""Scoring a text with one model or several as one (`lstm_jax.ensemble`: the mean of their
probabilities), each optionally adapting its weights as it reads (dynamic evaluation,
`lstm_jax.dynamic`), the prediction optionally mixed with the continuous cache
(`lstm_jax.cache`), keyed on the first member's hidden states.

The text is read as `num_streams` contiguous streams, in chunks (dynamic evaluation's segments),
all of it in one jitted `jax.lax.scan`. Each stream has its own state, its own cache and, when
adapting, its own copy of every member's weights. A chunk is scored before anything learns from
it: each member's weights step on the chunk's loss after it has been scored, and the chunk's
pairs enter the cache after it has been scored. The hyperparameters (theta, lambda, lr, decay)
are traced, so a sweep compiles once.

`python -m lstm_jax.evaluate --cache` and `--ensemble` score through it. Plain `evaluate` (with or
without `--dynamic`) keeps its own path (`lstm_jax.evaluate.score_ids`, `lstm_jax.dynamic`),
which equals this one with lambda 0 (tests/test_cache.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lstm_jax import cache as cache_lib
from lstm_jax.data import eval_streams
from lstm_jax.dynamic import decay_rates, update
from lstm_jax.ensemble import combine
from lstm_jax.models import CharLSTM

SCORE_CHUNK = 256  # Characters per step of the static pass (as lstm_jax.evaluate).


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of the ensemble: its parameters, and for dynamic evaluation its gradient RMS
    (`lstm_jax.dynamic.gradient_rms`)."""

    model: CharLSTM
    params: Any
    rms: Any = None


@dataclasses.dataclass(frozen=True)
class Adapt:
    """Dynamic evaluation's hyperparameters (`lstm_jax.dynamic.DynamicConfig`)."""

    lr: float
    decay: float
    segment: int
    epsilon: float = 2e-5


def score(
    members: list[Member], ids: np.ndarray, *, num_streams: int = 1,
    cache: cache_lib.CacheConfig | None = None, adapt: Adapt | None = None,
    chunk: int = SCORE_CHUNK,
) -> tuple[float, int]:  # fmt: skip
    """(mean loss in nats per character, characters scored) of every character of `ids` after
    the first: `position_losses` summed in float64."""
    losses, weights = position_losses(
        members, ids, num_streams=num_streams, cache=cache, adapt=adapt, chunk=chunk
    )
    count = float(weights.sum(dtype=np.float64))
    return float(losses.sum(dtype=np.float64)) / count, int(count)


def position_losses(
    members: list[Member], ids: np.ndarray, *, num_streams: int = 1,
    cache: cache_lib.CacheConfig | None = None, adapt: Adapt | None = None,
    chunk: int = SCORE_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(loss of every position, its weight), each [chunks, streams, chunk] as
    `lstm_jax.data.eval_streams` lays the text out (padding: weight 0, loss 0). `cache`: None
    or not `.cache` for none; `adapt`: None for static scoring (its segment is the chunk)."""
    use_cache = cache is not None and cache.cache
    chunk = adapt.segment if adapt is not None else chunk
    inputs, targets, weights = eval_streams(ids, num_streams, chunk)
    models = tuple(m.model for m in members)
    window = cache.cache_window if use_cache else 0
    run = _pass(models, window, adapt is not None)
    params0 = tuple(m.params for m in members)
    hidden = members[0].model.config.hidden
    caches = jax.vmap(lambda _: cache_lib.empty(max(window, 1), hidden))(jnp.arange(num_streams))
    hyper = {
        "theta": cache.cache_theta if use_cache else 0.0,
        "lam": cache.cache_lambda if use_cache else 0.0,
        "lr": adapt.lr if adapt else 0.0,
        "decay": adapt.decay if adapt else 0.0,
        "epsilon": adapt.epsilon if adapt else 0.0,
    }
    if adapt is not None:  # Each stream its own copy of the weights and a batch-1 state.
        params = tuple(_per_stream(p, num_streams) for p in params0)
        carries = tuple(
            jax.tree.map(lambda c: c[:, None], m.initialize_carry(num_streams)) for m in models
        )
        rms = tuple(m.rms for m in members)
        rates = tuple(decay_rates(r, adapt.decay) for r in rms)
    else:
        params, rms, rates = params0, (), ()
        carries = tuple(m.initialize_carry(num_streams) for m in models)
    losses = run(params, params0, rms, rates, carries, caches, inputs, targets, weights, hyper)
    return np.asarray(losses), weights


def _per_stream(tree: Any, num_streams: int) -> Any:
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (num_streams, *p.shape)), tree)


@functools.cache
def _pass(models: tuple[CharLSTM, ...], window: int, adapt: bool):
    """The jitted pass over the whole text for these members; `window` 0: no cache."""
    vocab = models[0].vocab_size

    def adapt_one(model, params, params0, rms, rates, carry, inputs, targets, weights, hyper):
        """One member, one stream's chunk [T]: scored, then learnt from."""

        def loss_fn(p):
            new_carry, logits, hidden = model.apply(
                {"params": p}, carry, inputs[None], return_hidden=True
            )
            losses = optax.softmax_cross_entropy_with_integer_labels(logits[0], targets)
            mean = (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)
            return mean, (new_carry, logits[0], hidden[0])

        (_, (carry, logits, hidden)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = update(
            params, grads, params0, rms, rates, hyper["lr"], hyper["decay"], hyper["epsilon"]
        )
        return params, carry, logits, hidden

    def body(params0, rms, rates, hyper, state, chunk):
        params, carries, caches = state
        inputs, targets, weights = chunk  # [streams, T]
        new_params, new_carries, member_log_probs, first_hidden = [], [], [], None
        for m, model in enumerate(models):
            if adapt:
                p, carry, logits, hidden = jax.vmap(
                    functools.partial(adapt_one, model),
                    in_axes=(0, None, None, None, 0, 0, 0, 0, None),
                )(params[m], params0[m], rms[m], rates[m], carries[m], inputs, targets, weights,
                  hyper)  # fmt: skip
            else:
                p = params[m]
                carry, logits, hidden = model.apply(
                    {"params": p}, carries[m], inputs, return_hidden=True
                )
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            member_log_probs.append(-nll)
            first_hidden = hidden if first_hidden is None else first_hidden
            new_params.append(p)
            new_carries.append(carry)
        log_prob = combine(jnp.stack(member_log_probs))  # [streams, T]
        if window:
            cache_lp, has = jax.vmap(cache_lib.cache_log_probs, in_axes=(0, 0, 0, 0, None, None))(
                caches, first_hidden, targets, weights, hyper["theta"], vocab
            )
            at_target = jnp.take_along_axis(cache_lp, targets[..., None], axis=-1)[..., 0]
            log_prob = cache_lib.mix_target(log_prob, at_target, has, hyper["lam"])
            caches = jax.vmap(cache_lib.advance)(caches, first_hidden, targets, weights)
        state = (tuple(new_params), tuple(new_carries), caches)
        return state, -log_prob * weights

    @jax.jit
    def run(params, params0, rms, rates, carries, caches, inputs, targets, weights, hyper):
        step = functools.partial(body, params0, rms, rates, hyper)
        _, losses = jax.lax.scan(step, (params, carries, caches), (inputs, targets, weights))
        return losses

    return run
