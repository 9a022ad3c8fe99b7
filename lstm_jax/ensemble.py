"""Ensembles: several models scored as one, the mean of their predicted probabilities (not of
their log probabilities). `python -m lstm_jax.evaluate --ensemble=W1,W2` reads the members out
of run folders; `lstm_jax.scoring` takes the members' models and parameters directly.

    p(c) = (1 / M) sum_m p_m(c),   log p(c) = logsumexp_m log p_m(c) - log M

An ensemble of one is its member, to the bit. `lstm_jax.scoring` runs the members over the text.
"""

from __future__ import annotations

import math

import jax


def combine(member_log_probs: jax.Array) -> jax.Array:
    """log of the mean of the members' probabilities: member_log_probs [members, ...] -> [...]."""
    count = member_log_probs.shape[0]
    return jax.nn.logsumexp(member_log_probs, axis=0) - math.log(count)
