"""Scoring a text with a model: the mean loss over every character of a set of streams.

`evaluate` takes the (mapped) evaluation step as an argument, so another kind of evaluation
(dynamic evaluation, which adapts the weights as it reads) is another step function passed in
by the caller, not a change to the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lstm_jax.models import Carry

Streams = tuple[np.ndarray, np.ndarray, np.ndarray]  # inputs, targets, weights: [chunks, rows, T]


def evaluate(
    eval_step: Callable,
    params: Any,
    streams: Streams,
    zero_carry: Carry,
    shard: Callable[[np.ndarray], Any] = lambda x: x,
) -> float:
    """Mean loss (nats per character) over `streams`, carrying the state from chunk to chunk.

    eval_step: (params, carry, inputs, targets, weights) -> (carry, {"loss_sum", "count"}).
    zero_carry: the state each stream starts from, laid out as `eval_step` takes it.
    shard: lays a [rows, T] chunk out for `eval_step` (devices first, for a pmapped step).
    Padding has weight 0, so it counts neither in the loss nor in the count.
    """
    inputs, targets, weights = streams
    carry, sums = zero_carry, []
    for chunk in range(inputs.shape[0]):
        carry, chunk_sums = eval_step(
            params, carry, shard(inputs[chunk]), shard(targets[chunk]), shard(weights[chunk])
        )
        sums.append(chunk_sums)
    sums = jax.device_get(sums)
    return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)
