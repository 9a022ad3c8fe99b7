"""Data parallelism: how the pure steps are mapped over this host's devices.

This is the one place that knows about `jax.pmap`. It follows JAX's pmap migration guide: the
train state goes in unmapped and comes out replicated (`in_axes=None`, `out_axes=None`), so there
is no replicate/unreplicate in the loop; batches and the carried LSTM state are mapped over the
leading device axis. To try another parallel wrapper (jit with shardings, shard_map), change
this module only.

Multi-process (one process per host, see `lstm_jax.distributed`): each process feeds only its
local devices, and pmap maps over every process's devices, so the gradient mean spans the job.
pmap hands back host-local arrays (replicated over this host's devices); Orbax wants global
ones, so `to_global`/`to_host_local` convert at the checkpoint boundary. With one process both
are the identity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lstm_jax import steps

AXIS = "devices"


def step_devices(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """Every device a step runs on: `devices`, or in a multi-process job each process's local
    devices in process order (the order pmap itself uses, and the order of the batch rows)."""
    if jax.process_count() == 1:
        return list(devices)
    return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]


def replicated_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
    """Where the train state lives: a full copy on every device."""
    return NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec())


def global_replicated_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
    """A full copy on every device of the job: how Orbax sees the train state."""
    return replicated_sharding(step_devices(devices))


def to_global(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Host-local replicated arrays (pmap outputs) -> global replicated arrays, for saving."""
    if jax.process_count() == 1:
        return tree
    mesh = global_replicated_sharding(devices).mesh
    return multihost_utils.host_local_array_to_global_array(tree, mesh, PartitionSpec())


def to_host_local(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Global replicated arrays (restored) -> this host's replicated copies, as pmap takes them."""
    if jax.process_count() == 1:
        return tree
    mesh = global_replicated_sharding(devices).mesh
    return multihost_utils.global_array_to_host_local_array(tree, mesh, PartitionSpec())


def gather_rows(tree: Any) -> Any:
    """Every process's [rows, ...] host arrays -> the whole [global rows, ...], in process order."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


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
        functools.partial(steps.train_step, axis_name=AXIS),
        axis_name=AXIS,
        in_axes=(None, 0, 0, None),
        out_axes=(None, 0, None),
        devices=step_devices(devices),
    )


def eval_step(apply_fn: Callable, devices: Sequence[jax.Device]) -> Callable:
    """(params, carry[d, ...], inputs, targets, weights) -> (carry[d, ...], metric sums)."""
    return jax.pmap(
        functools.partial(steps.eval_step, apply_fn=apply_fn, axis_name=AXIS),
        axis_name=AXIS,
        in_axes=(None, 0, 0, 0, 0),
        out_axes=(0, None),
        devices=step_devices(devices),
    )
