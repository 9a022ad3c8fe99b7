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

import dataclasses
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


def one_call_in_flight(step: Callable, devices: Sequence[jax.Device]) -> Callable:
    """`step` (a pmapped function, or its compiled form) made to wait for each call's outputs
    where XLA:CPU runs several devices; unchanged on one device and on accelerators.

    XLA:CPU runs each device's part of a pmapped call as a task on one shared thread pool, and a
    collective (the gradient mean) waits until every device's part has reached it. Calls queued
    by asynchronous dispatch can fill the pool with parts of later calls waiting at their
    collective while an earlier call's part waits for a thread: "Expected 8 threads to join the
    rendezvous, but only 7 of them arrived", then an abort after 40 s (8 devices on a 2-core
    Intel Xeon, JAX 0.10.2, after about a hundred queued steps). One call at a time cannot.
    """
    if len(devices) == 1 or devices[0].platform != "cpu":
        return step

    @functools.wraps(step)
    def one_at_a_time(*args: Any) -> Any:
        return jax.block_until_ready(step(*args))

    return one_at_a_time


def _pmap(fun: Callable, devices: Sequence[jax.Device], **kwargs: Any) -> Callable:
    return one_call_in_flight(jax.pmap(fun, devices=devices, **kwargs), devices)


def train_step(devices: Sequence[jax.Device]) -> Callable:
    """(state, batch[d, b, t+1], carry[d, ...], reset) -> (state, carry[d, ...], metrics)."""
    return _pmap(
        functools.partial(steps.train_step, axis_name=AXIS),
        axis_name=AXIS,
        in_axes=(None, 0, 0, None),
        out_axes=(None, 0, None),
        devices=step_devices(devices),
    )


def eval_step(apply_fn: Callable, devices: Sequence[jax.Device]) -> Callable:
    """(params, carry[d, ...], inputs, targets, weights) -> (carry[d, ...], metric sums)."""
    return _pmap(
        functools.partial(steps.eval_step, apply_fn=apply_fn, axis_name=AXIS),
        axis_name=AXIS,
        in_axes=(None, 0, 0, 0, 0),
        out_axes=(0, None),
        devices=step_devices(devices),
    )


# --- Populations: a leading member axis, vmapped, over the devices --------------------------

MEMBERS_AXIS = "members"


def _first(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


def _over_members(f: Callable, in_axes: tuple, vmapped: bool) -> Callable:
    """`f` over the leading member axis of the arguments whose `in_axes` is 0: `jax.vmap`, or
    `lax.map` (one member after another inside the step) where batching the members is slower
    than running them in turn, as XLA:CPU's batched matmuls are."""
    if vmapped:
        return jax.vmap(f, in_axes=in_axes)

    def one_after_another(*args):
        def member(xs):
            each = iter(xs)
            return f(*(next(each) if ax == 0 else a for a, ax in zip(args, in_axes, strict=True)))

        return jax.lax.map(member, tuple(a for a, ax in zip(args, in_axes, strict=True) if ax == 0))

    return one_after_another


@dataclasses.dataclass(frozen=True)
class PopulationLayout:
    """How the members of a population (`lstm_jax.population`) map over this host's devices.

    The rule: when the member count is a multiple of the device count (and there are several
    devices), the members are *sharded* over the devices, members / devices on each, every
    member's batch whole on its device: member k then computes what a single run of its
    settings computes on one device. Otherwise every member is *data parallel* over all the
    devices, as a single run is: the state [members, ...] replicated, each device a slice of
    every member's batch, gradients averaged over devices. On the host every per-member array
    is [members, rows, ...] (`to_devices` / `to_host` convert); in the sharded layout a
    size-1 axis named like the devices' makes the step see the one-device run it equals.
    """

    members: int
    devices: tuple[jax.Device, ...]
    member_loop: str = "auto"  # --member_loop: vmap, map, or auto (map on a CPU).

    @property
    def sharded(self) -> bool:
        return len(self.devices) > 1 and self.members % len(self.devices) == 0

    @property
    def vmapped(self) -> bool:
        if self.member_loop != "auto":
            return self.member_loop == "vmap"
        return getattr(self.devices[0], "platform", jax.default_backend()) != "cpu"

    def describe(self) -> str:
        d = len(self.devices)
        loop = "vmapped" if self.vmapped else "one after another (--member_loop=map)"
        if self.sharded:
            return (
                f"{self.members} members sharded over {d} devices, {self.members // d} each, {loop}"
            )
        return f"{self.members} members, each data parallel over {d} device(s), {loop}"

    def to_devices(self, x: np.ndarray) -> np.ndarray:
        """A per-member host array [members, rows, ...] laid out for the mapped steps."""
        d, m = len(self.devices), self.members
        if self.sharded:
            return x.reshape(d, m // d, 1, *x.shape[1:])
        return x.reshape(m, d, x.shape[1] // d, *x.shape[2:]).swapaxes(0, 1)

    def to_host(self, x: Any) -> np.ndarray:
        """The inverse of `to_devices`: [members, rows, ...] on the host."""
        x = np.asarray(x)
        if self.sharded:
            return x.reshape(self.members, *x.shape[3:])
        x = x.swapaxes(0, 1)
        return x.reshape(self.members, x.shape[1] * x.shape[2], *x.shape[3:])

    def state_to_devices(self, tree: Any) -> Any:
        """The members' state (or hyperparameters), [members, ...], as the steps take it."""
        if self.sharded:
            d = len(self.devices)
            return jax.tree.map(lambda x: np.asarray(x).reshape(d, -1, *x.shape[1:]), tree)
        return replicate(tree, self.devices)

    def state_to_host(self, tree: Any) -> Any:
        """The members' state as [members, ...] arrays, for a checkpoint."""
        if self.sharded:
            return jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)
        return tree

    def rows(self, x: np.ndarray) -> Any:
        """One evaluation chunk [rows, T], the same for every member, laid out for the step."""
        return x[None] if self.sharded else shard(x, len(self.devices))

    def train_step(self) -> Callable:
        """(states, batch, carry, reset, hparams) -> (states, carry, per-member metric sums)."""
        step = functools.partial(steps.train_step, axis_name=AXIS)
        if not self.sharded:
            return _pmap(
                _over_members(step, (0, 0, 0, None, 0), self.vmapped),
                axis_name=AXIS,
                in_axes=(None, 0, 0, None, None),
                out_axes=(None, 0, None),
                devices=list(self.devices),
            )
        one_device = jax.vmap(step, in_axes=(None, 0, 0, None, None), axis_name=AXIS)

        def member(state, batch, carry, reset, hparams):
            state, carry, metrics = one_device(state, batch, carry, reset, hparams)
            return _first(state), carry, _first(metrics)

        return _pmap(
            _over_members(member, (0, 0, 0, None, 0), self.vmapped),
            axis_name=MEMBERS_AXIS,
            in_axes=(0, 0, 0, None, 0),
            devices=list(self.devices),
        )

    def eval_step(self, apply_fn: Callable) -> Callable:
        """(params, carry, inputs, targets, weights) -> (carry, per-member metric sums)."""
        step = functools.partial(steps.eval_step, apply_fn=apply_fn, axis_name=AXIS)
        if not self.sharded:
            return _pmap(
                _over_members(step, (0, 0, None, None, None), self.vmapped),
                axis_name=AXIS,
                in_axes=(None, 0, 0, 0, 0),
                out_axes=(0, None),
                devices=list(self.devices),
            )
        one_device = jax.vmap(step, in_axes=(None, 0, 0, 0, 0), axis_name=AXIS)

        def member(params, carry, inputs, targets, weights):
            carry, metrics = one_device(params, carry, inputs, targets, weights)
            return carry, _first(metrics)

        return _pmap(
            _over_members(member, (0, 0, None, None, None), self.vmapped),
            axis_name=MEMBERS_AXIS,
            in_axes=(0, 0, None, None, None),
            devices=list(self.devices),
        )
