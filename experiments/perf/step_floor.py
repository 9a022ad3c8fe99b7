"""Experiment: the floor XLA:CPU puts under one LSTM training step, against issue 3's goal.

Issue 3 asks for 1.2x PyTorch's `nn.LSTM` at 1 x 256 and 1.1x at 2 x 512 (float32, batch 64 x
100). This script asks whether any JAX program can get there on this backend. It times, each
alone and each at the speed XLA reaches for its shape, the work every exact LSTM training step
has to do, however it is written:

- matmuls: per layer, the 100 per-step recurrent products of the forward scan ([B, H] x [H, 4H])
  and of the backward scan ([B, 4H] x [4H, H]), and the products over the whole sequence (input
  projection, input gradient, the two weight gradients); the output layer's three products;
- elementwise: per layer, the gate nonlinearities and the cell update in the forward scan,
  storing what the backward pass needs (gate activations and cell state, one [B, 5H] row per
  step), and the gate gradients in the backward scan, storing each step's [B, 4H] gradient.

The sum of the parts is a lower bound for a step built from XLA ops (it leaves out the loss,
the optimizer, the embedding and all glue). The script then times the real `lstm_jax` step and,
when PyTorch is installed, PyTorch's, both through `lstm_jax.bench` in this process, and prints
the step time the goal needs next to the floor.

    python experiments/perf/step_floor.py --hidden=256 --num_layers=1 --goal=1.2
    python experiments/perf/step_floor.py --hidden=512 --num_layers=2 --goal=1.1

Results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lstm_jax.bench import BenchConfig, BenchOptions, load_peer, measure_training

BATCH, TIME, EMBED, VOCAB = 64, 100, 64, 96
REPEATS = 7


def _milliseconds(function: Callable, *args) -> float:
    """Median wall time of a jitted call, after one call that compiles it."""
    jax.block_until_ready(function(*args))
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        seconds.append(time.perf_counter() - start)
    return 1e3 * statistics.median(seconds)


def _normal(key: int, shape: tuple[int, ...], scale: float = 0.1) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(key), shape)


@jax.jit
def _forward_recurrence(kernel: jax.Array, projected: jax.Array) -> jax.Array:
    """100 steps of h @ W_h + x_t W_x, nothing else: only the forward scan's products."""
    hidden = kernel.shape[0]

    def step(h, z):
        return (h @ kernel + z)[:, :hidden], None

    return jax.lax.scan(step, jnp.zeros((BATCH, hidden)), projected)[0]


@jax.jit
def _backward_recurrence(kernel_t: jax.Array, gate_grads: jax.Array) -> jax.Array:
    """100 reverse steps of dz_t @ W_h^T: only the backward scan's products."""
    hidden = kernel_t.shape[1]

    def step(dh, dz):
        return (dz + jnp.pad(dh, ((0, 0), (0, 3 * hidden)))) @ kernel_t, None

    return jax.lax.scan(step, jnp.zeros((BATCH, hidden)), gate_grads, reverse=True)[0]


@jax.jit
def _forward_gates(projected: jax.Array) -> tuple:
    """The forward scan's elementwise work and stores, with the products left out."""
    hidden = projected.shape[-1] // 4

    def step(carry, z):
        c, h = carry
        z = z + jnp.pad(h, ((0, 0), (0, 3 * hidden)))
        i, f, g, o = jnp.split(z, 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), (jnp.concatenate([i, f, g, o], axis=-1), c)

    zeros = jnp.zeros((BATCH, hidden))
    return jax.lax.scan(step, (zeros, zeros), projected)


@jax.jit
def _backward_gates(activations: jax.Array, cells: jax.Array, output_grads: jax.Array) -> tuple:
    """The backward scan's elementwise work and its per-step gradient store, no products."""
    hidden = cells.shape[-1]
    previous_cells = jnp.concatenate([jnp.zeros_like(cells[:1]), cells[:-1]])

    def step(carry, per_step):
        dc_next, dh_next = carry
        dh_out, gates, c, c_prev = per_step
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        dh = dh_out + dh_next
        tanh_c = jnp.tanh(c)
        dc = dc_next + dh * o * (1 - tanh_c * tanh_c)
        dz = jnp.concatenate(
            [
                dc * g * i * (1 - i),
                dc * c_prev * f * (1 - f),
                dc * i * (1 - g * g),
                dh * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )
        return (dc * f, dz[:, :hidden]), dz

    zeros = jnp.zeros((BATCH, hidden))
    per_step = (output_grads, activations, cells, previous_cells)
    return jax.lax.scan(step, (zeros, zeros), per_step, reverse=True)


def layer_floor(input_size: int, hidden: int) -> dict[str, float]:
    """Milliseconds of each part of one LSTM layer's forward and backward, timed alone."""
    rows = TIME * BATCH
    kernel = _normal(1, (hidden, 4 * hidden), 0.05)
    input_kernel = _normal(2, (input_size, 4 * hidden), 0.05)
    projected = _normal(3, (TIME, BATCH, 4 * hidden))
    inputs = _normal(4, (rows, input_size))
    states = _normal(5, (rows, hidden))
    gate_grads = _normal(6, (rows, 4 * hidden))
    _, (activations, cells) = _forward_gates(projected)
    output_grads = _normal(7, (TIME, BATCH, hidden))
    return {
        "forward recurrence": _milliseconds(_forward_recurrence, kernel, projected),
        "backward recurrence": _milliseconds(_backward_recurrence, kernel.T, projected),
        "input projection": _milliseconds(jax.jit(lambda x, w: x @ w), inputs, input_kernel),
        "input gradient": _milliseconds(jax.jit(lambda d, w: d @ w.T), gate_grads, input_kernel),
        "input kernel gradient": _milliseconds(jax.jit(lambda x, d: x.T @ d), inputs, gate_grads),
        "recurrent kernel gradient": _milliseconds(
            jax.jit(lambda h, d: h.T @ d), states, gate_grads
        ),
        "forward gates + stores": _milliseconds(_forward_gates, projected),
        "backward gates + stores": _milliseconds(_backward_gates, activations, cells, output_grads),
    }


def output_floor(hidden: int) -> float:
    """Milliseconds of the output layer's three products (logits, their two gradients)."""
    states = _normal(8, (TIME * BATCH, hidden))
    kernel = _normal(9, (hidden, VOCAB))
    logit_grads = _normal(10, (TIME * BATCH, VOCAB))
    return (
        _milliseconds(jax.jit(lambda h, w: h @ w), states, kernel)
        + _milliseconds(jax.jit(lambda d, w: d @ w.T), logit_grads, kernel)
        + _milliseconds(jax.jit(lambda h, d: h.T @ d), states, logit_grads)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--goal", type=float, default=1.1, help="Wanted ratio to PyTorch.")
    options = parser.parse_args()

    output_ms = output_floor(options.hidden)
    matmul_ms, elementwise_ms = output_ms, 0.0
    print(
        f"{options.num_layers} x {options.hidden} LSTM, batch {BATCH} x {TIME}, float32, "
        f"{jax.devices()[0].platform}; each part timed alone (median of {REPEATS})"
    )
    for layer in range(options.num_layers):
        input_size = EMBED if layer == 0 else options.hidden
        for part, ms in layer_floor(input_size, options.hidden).items():
            print(f"  layer {layer} {part:28s} {ms:8.1f} ms")
            if "gates" in part:
                elementwise_ms += ms
            else:
                matmul_ms += ms
    print(f"  output layer, 3 products          {output_ms:8.1f} ms")

    # The bench's defaults (the headline batch, the peer's step), at this script's size.
    config = BenchConfig.create(hidden=options.hidden, num_layers=options.num_layers)
    has_torch = importlib.util.find_spec("torch") is not None
    peer = load_peer("pytorch") if has_torch else None
    devices = jax.local_devices()[:1]
    ours, theirs, _, _ = measure_training(
        config, BenchOptions(windows=5), devices, peer=peer, log=lambda _: None
    )
    print(f"matmuls alone                       {matmul_ms:8.1f} ms")
    print(f"elementwise + stores alone          {elementwise_ms:8.1f} ms")
    print(f"floor (sum of the parts)            {matmul_ms + elementwise_ms:8.1f} ms")
    print(f"lstm_jax step, measured             {1e3 * ours['step_seconds']:8.1f} ms")
    if theirs is not None:
        goal_ms = 1e3 * theirs["step_seconds"] / options.goal
        print(f"PyTorch step, measured              {1e3 * theirs['step_seconds']:8.1f} ms")
        print(f"goal step ({options.goal}x PyTorch)           {goal_ms:8.1f} ms")
        print(
            f"the floor is {(matmul_ms + elementwise_ms) / goal_ms:.2f}x the goal step; "
            f"the matmuls alone are {matmul_ms / goal_ms:.2f}x"
        )


if __name__ == "__main__":
    main()
