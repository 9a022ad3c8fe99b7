"""The layer wavefront (`--scan=wavefront`): a stack of recurrent layers as ONE scan over time.

Stacked layers scanned one after another take layers x time steps in a row, each a small
dependent computation; on a GPU the training step is bound by that latency, not by FLOPs.
In the wavefront, iteration s runs every layer at once, layer l on time step s - l (its input
is what layer l - 1 produced in iteration s - 1), so L layers over T steps take T + L - 1
iterations in a row instead of L * T. The first and last L - 1 iterations are partial: a layer
outside its own steps computes on padding and its carry is held, so every layer's carry ends
exactly where the layered scan's does.

This module owns only that schedule, over pure functions: the model (`lstm_jax.models`) builds
the per-layer steps from its parameters and draws the dropout masks, so the parameter tree and
the random draws are the layered path's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# One layer's time step: (carry, x [batch, in], extra) -> (carry, y [batch, out]), where extra
# is that layer's own input for the step (a dropout mask, say), or None.
LayerStep = Callable[[Any, jax.Array, Any], tuple[Any, jax.Array]]


def wavefront_scan(
    steps: Sequence[LayerStep],
    carries: Sequence[Any],
    xs: jax.Array,
    extras: Sequence[Any] | None = None,
    *,
    remat: bool = False,
    unroll: int = 1,
) -> tuple[tuple[Any, ...], jax.Array]:
    """Run `steps` as a stack over xs [batch, time, in] -> (final carries, ys [batch, time, out]).

    Equal to scanning layer 0 over xs, then layer 1 over its outputs, and so on. `extras[l]` is
    None or a pytree of [batch, time, ...] arrays, given to layer l step by step. `remat`
    recomputes each iteration in the backward pass (`jax.checkpoint`); `unroll` is the scan's.
    """
    num_layers, length = len(steps), xs.shape[1]
    extras = list(extras) if extras is not None else [None] * num_layers
    pad = num_layers - 1

    def time_major(tree: Any, before: int) -> Any:
        # [batch, time, ...] -> [iterations, batch, ...], the steps of layer l at iterations l..
        def move(a: jax.Array) -> jax.Array:
            a = jnp.moveaxis(a, 1, 0)
            return jnp.pad(a, [(before, pad - before)] + [(0, 0)] * (a.ndim - 1))

        return jax.tree.map(move, tree)

    inputs = (time_major(xs, 0), [time_major(e, layer) for layer, e in enumerate(extras)])

    # Each layer's output feeds the next layer one iteration later; its shape and dtype come
    # from the step itself (a bfloat16 cell gives bfloat16).
    def one_step(a: jax.Array) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape[:1] + a.shape[2:], a.dtype)

    pending, x = [], one_step(xs)
    for step, carry, extra in zip(steps[:-1], carries, extras, strict=False):
        x = jax.eval_shape(step, carry, x, jax.tree.map(one_step, extra))[1]
        pending.append(jnp.zeros(x.shape, x.dtype))

    def iteration(state: tuple[Any, ...], inputs: tuple[Any, ...]) -> tuple[Any, jax.Array]:
        carries, pending = state
        s, x, extras = inputs
        new_carries, outputs = [], []
        for layer, step in enumerate(steps):
            layer_input = x if layer == 0 else pending[layer - 1]
            carry, y = step(carries[layer], layer_input, extras[layer])
            # Outside its own steps (the ramp up and down) a layer keeps its carry.
            real = (s >= layer) & (s < length + layer)
            keep = lambda new, old, real=real: jnp.where(real, new, old)  # noqa: E731
            new_carries.append(jax.tree.map(keep, carry, carries[layer]))
            outputs.append(y)
        return (tuple(new_carries), outputs[:-1]), outputs[-1]

    if remat:
        # prevent_cse=False: inside a scan XLA cannot merge the recomputation away.
        iteration = jax.checkpoint(iteration, prevent_cse=False)
    iterations = jnp.arange(length + pad)
    (carries, _), ys = jax.lax.scan(
        iteration, (tuple(carries), pending), (iterations, *inputs), unroll=unroll
    )
    # The top layer's step t came out of iteration t + L - 1.
    return carries, jnp.moveaxis(ys[pad:], 0, 1)
