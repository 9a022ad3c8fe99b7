"""Data parallelism: how the pure steps are mapped over this host's devices.

This is the one place that knows about `jax.pmap`. It follows JAX's pmap migration guide: the
train state goes in unmapped and comes out replicated (`in_axes=None`, `out_axes=None`), so there
is no replicate/unreplicate in the loop; batches and the carried LSTM state are mapped over the
leading device axis. To try another parallel wrapper (jit with shardings, shard_map), change
this module only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lstm_jax import train

AXIS = "devices"


def replicated_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
    """Where the train state lives: a full copy on every device."""
    return NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec())


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    return jax.device_put(tree, replicated_sharding(devices))


def shard(x: np.ndarray, num_devices: int) -> np.ndarray:
    """[batch, ...] -> [devices, batch / devices, ...] for a mapped argument."""
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])


def unshard(x: Any) -> np.ndarray:
    """[devices, batch / devices, ...] -> [batch, ...] on the host."""
    x = np.asarray(x)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def train_step(devices: Sequence[jax.Device]) -> Callable:
    """(state, batch[d, b, t+1], carry[d, ...], reset) -> (state, carry[d, ...], metrics)."""
    return jax.pmap(
        functools.partial(train.train_step, axis_name=AXIS),
        axis_name=AXIS,
        in_axes=(None, 0, 0, None),
        out_axes=(None, 0, None),
        devices=devices,
    )


def eval_step(apply_fn: Callable, devices: Sequence[jax.Device]) -> Callable:
    """(params, carry[d, ...], inputs, targets, weights) -> (carry[d, ...], metric sums)."""
    return jax.pmap(
        functools.partial(train.eval_step, apply_fn=apply_fn, axis_name=AXIS),
        axis_name=AXIS,
        in_axes=(None, 0, 0, 0, 0),
        out_axes=(0, None),
        devices=devices,
    )
