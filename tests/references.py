"""Independent reference computations that tests compare the code under test with.

Written from the definitions (softmax cross-entropy, the schedule's formula, one `model.apply`
per evaluation stream), sharing nothing with the training loop but the model itself.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def cross_entropy_sum(logits, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits)[target], in float64 on the host."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float((log_z - picked).sum())


def stream_loss(model, params, ids: np.ndarray, num_streams: int, seq_len: int) -> float:
    """Mean loss (nats/char) over `ids` read as `num_streams` contiguous streams, each in one
    `model.apply` from a zero state.

    Streams are whole multiples of `seq_len` long (the evaluation's layout), so only the end of
    the text is short; every character after the first is predicted exactly once.
    """
    num_targets = len(ids) - 1
    stream_len = math.ceil(math.ceil(num_targets / num_streams) / seq_len) * seq_len
    total = 0.0
    for begin in range(0, num_targets, stream_len):
        end = min(begin + stream_len, num_targets)
        _, logits = model.apply(
            {"params": params}, model.initialize_carry(1), jnp.asarray(ids[begin:end][None])
        )
        total += cross_entropy_sum(logits[0], ids[begin + 1 : end + 1])
    return total / num_targets


def warmup_cosine(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0, then cosine decay to 10% of the peak at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    end = 0.1 * peak
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
