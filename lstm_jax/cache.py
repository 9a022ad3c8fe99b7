"""The continuous cache (Grave et al., 2017, "Improving neural language models with a continuous
cache"): the model's prediction mixed with a copy of what followed similar states in the text
already scored.

The cache holds the pairs (h_i, x_{i+1}) of the last `cache_window` positions i: h_i the last
layer's output after reading x_i (the output layer's input), x_{i+1} the character that followed
it. At position t, predicting x_{t+1} from h_t,

    p_cache(c) = sum_{t - window <= i < t} softmax_i(theta * h_t . h_i) [x_{i+1} == c]
    p(c)       = (1 - lambda) p_model(c) + lambda p_cache(c)

and p = p_model at a stream's first position (an empty cache). Strictly causal: the pair of
position i enters the cache only after x_{i+1} has been scored (at position i < t), so no
prediction sees the character it predicts or anything after it. With lambda = 0 the scores are
the model's, to the bit.

This module owns the cache of one stream over one chunk at a time (`cache_log_probs`,
`advance`) and the mixture (`mix_target`, `mix_distribution`); `lstm_jax.scoring` runs them
over the text, with dynamic evaluation and ensembles. `CacheConfig` declares the settings of
`python -m lstm_jax.evaluate --cache`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lstm_jax.config import setting
from lstm_jax.settings import NON_NEGATIVE, RATE, Range

WINDOW = Range(1, 100_000)  # Positions; the cache of a 512-wide model at 100,000 is 200 MB.


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """continuous cache: the prediction mixed with what followed similar states"""

    cache: bool = setting(
        False, "Mix each prediction with a continuous cache over the hidden states of the "
        "text already scored (Grave et al., 2017).",
    )  # fmt: skip
    cache_window: int = setting(
        2000, "Positions the cache holds (the most recent), in characters.", within=WINDOW
    )
    cache_theta: float = setting(
        0.4, "The cache's inverse temperature on the dot products of hidden states; tune it "
        "on validation.", within=NON_NEGATIVE,
    )  # fmt: skip
    cache_lambda: float = setting(
        0.1, "The cache's weight in the mixture (the model's: 1 - it); 0: the model alone.",
        within=RATE,
    )  # fmt: skip


class CacheState(NamedTuple):
    """One stream's cache: the last `window` positions, oldest first."""

    keys: jax.Array  # [window, hidden] float32: the hidden states h_i.
    values: jax.Array  # [window] int32: the characters x_{i+1} that followed them.
    valid: jax.Array  # [window] bool: filled (not the empty start, not padding).


def empty(window: int, hidden: int) -> CacheState:
    return CacheState(
        jnp.zeros((window, hidden), jnp.float32),
        jnp.zeros((window,), jnp.int32),
        jnp.zeros((window,), bool),
    )


def _entries(state: CacheState, hidden, targets, weights):
    """The cache followed by the chunk's own pairs, with their positions relative to the
    chunk's start (the cache's at -window..-1)."""
    window, length = state.values.shape[0], targets.shape[0]
    keys = jnp.concatenate([state.keys, hidden.astype(jnp.float32)])
    values = jnp.concatenate([state.values, targets.astype(jnp.int32)])
    valid = jnp.concatenate([state.valid, weights > 0])
    positions = jnp.arange(-window, length)
    return keys, values, valid, positions


def cache_log_probs(
    state: CacheState, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
    theta: jax.Array | float, vocab_size: int,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(log p_cache [T, vocab], whether the cache had an entry [T]) at every position of a
    chunk of one stream: hidden [T, width] the states h_t, targets [T] the characters x_{t+1}
    (read only where they entered the cache, at earlier positions), weights [T] 0 on padding.
    Where the cache is empty, log p_cache is -inf everywhere."""
    window = state.values.shape[0]
    keys, values, valid, positions = _entries(state, hidden, targets, weights)
    t = jnp.arange(targets.shape[0])[:, None]
    allowed = valid[None] & (positions[None] < t) & (positions[None] >= t - window)
    scores = theta * (hidden.astype(jnp.float32) @ keys.T)  # [T, window + T]
    top = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(allowed, jnp.exp(scores - top), 0.0)
    total = e.sum(-1, keepdims=True)
    attention = e / jnp.where(total > 0, total, 1.0)
    probs = attention @ jax.nn.one_hot(values, vocab_size, dtype=jnp.float32)
    return jnp.log(probs), allowed.any(-1)


def advance(state: CacheState, hidden: jax.Array, targets: jax.Array, weights: jax.Array):
    """The cache after the chunk: its pairs added, the oldest beyond the window dropped."""
    window = state.values.shape[0]
    keys, values, valid, _ = _entries(state, hidden, targets, weights)
    return CacheState(keys[-window:], values[-window:], valid[-window:])


def mix_target(
    model_log_prob: jax.Array, cache_log_prob: jax.Array, has_cache: jax.Array, lam
) -> jax.Array:
    """log p of the mixture at each position, from the model's and the cache's log
    probabilities of the same character; the model's alone where the cache is empty. With
    lam = 0 it is `model_log_prob` exactly (log(1 - 0) = 0, log 0 = -inf)."""
    mixed = jnp.logaddexp(jnp.log1p(-lam) + model_log_prob, jnp.log(lam) + cache_log_prob)
    return jnp.where(has_cache, mixed, model_log_prob)


def mix_distribution(model_log_probs, cache_log_probs_, has_cache, lam) -> jax.Array:
    """`mix_target` over the whole vocabulary: [T, vocab] log probabilities."""
    return mix_target(model_log_probs, cache_log_probs_, has_cache[:, None], lam)
