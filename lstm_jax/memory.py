"""Memory a training step needs, roughly, against the machine's: absurd sizes are refused in one
line before anything is allocated or compiled, instead of running out of memory with a
traceback (`lstm_jax.bench` checks its sizes with `refuse_sizes_beyond_memory`).

The estimate is deliberately simple, meant to catch sizes that are off by orders of magnitude
(a typo, `--hidden=1000000`), not to predict XLA's plan; `bench` reports the real peak after.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from lstm_jax.config import Config
from lstm_jax.errors import UsageError
from lstm_jax.models import forward_flops_per_char, state_flops_per_char

FLOAT32_BYTES = 4
# Arrays per parameter in training: the parameter, its gradient and Adam's two moments.
COPIES_PER_PARAMETER = 4
# Numbers per hidden unit, time step and layer kept for the backward pass: an LSTM's 4 gates,
# its cell and hidden state, tanh of the cell, the layer's input; a cell with fewer keeps less.
# With --remat only the carry (cell and hidden state) is kept, the rest is recomputed.
SAVED_PER_UNIT, SAVED_PER_UNIT_REMAT = 8, 2


def training_bytes(config: Config, vocab_size: int) -> dict[str, int]:
    """Rough bytes of one training step on one device, by part: "weights" (parameters, gradients
    and optimizer state) and "activations" (what the backward pass keeps for a whole batch)."""
    model, data = config.model, config.data
    # Each matmul weight is used once per character in a multiply-add (2 FLOPs): the cells' own
    # FLOP counts give their weights, whatever the cell, less what the cells' state does
    # without a weight (a matrix memory, attention). Biases and norms are left out (small).
    weight_flops = forward_flops_per_char(model, vocab_size) - state_flops_per_char(model)
    parameters = weight_flops // 2 + vocab_size * model.embed_dim
    saved = SAVED_PER_UNIT_REMAT if config.compute.remat else SAVED_PER_UNIT
    per_char = model.embed_dim + saved * model.hidden * model.num_layers
    activations = per_char * jnp.dtype(config.compute.dtype).itemsize
    activations += 2 * vocab_size * FLOAT32_BYTES  # Float32 logits and their gradient.
    return {
        "weights": COPIES_PER_PARAMETER * parameters * FLOAT32_BYTES,
        "activations": data.global_batch * data.seq_len * activations,
    }


def physical_memory_bytes() -> int | None:
    """The machine's RAM; None where the system does not say (not POSIX)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def refuse_sizes_beyond_memory(config: Config, vocab_size: int) -> None:
    """A `UsageError` naming the sizes to lower where `training_bytes` is more than the machine's
    RAM. An accelerator has less memory than that, so this only catches the clearly impossible;
    what fits in RAM but not on the device is left to XLA's own out-of-memory error."""
    parts, memory = training_bytes(config, vocab_size), physical_memory_bytes()
    if memory is None or sum(parts.values()) <= memory:
        return
    model, data = config.model, config.data

    def gib(size: int) -> str:
        return f"{size / 2**30:,.1f} GiB"

    weights = (
        f"--hidden={model.hidden}, --num_layers={model.num_layers}, "
        f"--embed_dim={model.embed_dim}, {vocab_size} characters"
    )
    batch = f"--global_batch={data.global_batch} x --seq_len={data.seq_len} x hidden x layers"
    lower = "--hidden or --num_layers" if parts["weights"] > parts["activations"] else (
        "--global_batch or --seq_len"
    )  # fmt: skip
    raise UsageError(
        f"These sizes need about {gib(sum(parts.values()))} of memory, more than this machine's "
        f"{gib(memory)}: {gib(parts['weights'])} for the parameters, their gradients and Adam "
        f"state ({weights}) and {gib(parts['activations'])} for activations ({batch}). "
        f"Lower {lower}."
    )
