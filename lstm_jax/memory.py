"""Memory a training step needs, roughly, against the machine's: absurd sizes are refused in one
line before anything is allocated or compiled, instead of running out of memory with a
traceback. A command lists what it allocates, one `Need` a phase (a training step, bench's
matmul, generation), and `refuse_beyond_memory` refuses them in one line naming the flags to
lower; `lstm_jax.bench` checks every size it allocates so, before compiling.

The estimate is deliberately simple, meant to catch sizes that are off by orders of magnitude
(a typo, `--hidden=1000000`), not to predict XLA's plan; `bench` reports the real peak after.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Need:
    """Memory one phase of a command allocates: about `size` bytes, for `what` (words naming the
    sizes, as flags), and the flags to `lower` when it does not fit."""

    size: int
    what: str
    lower: str


def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def training_need(config: Config, vocab_size: int) -> Need:
    """A training step's parameters, gradients, Adam state and activations (`training_bytes`)."""
    parts, model, data = training_bytes(config, vocab_size), config.model, config.data
    weights = (
        f"--hidden={model.hidden}, --num_layers={model.num_layers}, "
        f"--embed_dim={model.embed_dim}, {vocab_size} characters"
    )
    batch = f"--global_batch={data.global_batch} x --seq_len={data.seq_len} x hidden x layers"
    lower = "--hidden or --num_layers" if parts["weights"] > parts["activations"] else (
        "--global_batch or --seq_len"
    )  # fmt: skip
    what = (
        f"about {_gib(sum(parts.values()))} for a training step: {_gib(parts['weights'])} for "
        f"the parameters, their gradients and Adam state ({weights}) and "
        f"{_gib(parts['activations'])} for activations ({batch})"
    )
    return Need(sum(parts.values()), what, lower)


def matmul_need(size: int, num_devices: int, dtype: str) -> Need:
    """A [size, size] @ [size, size] matmul on each device: its two inputs and its output."""
    total = 3 * num_devices * size * size * jnp.dtype(dtype).itemsize
    what = (
        f"about {_gib(total)} for the peak FLOP/s matmul (three {size} x {size} {dtype} arrays "
        f"on each of {num_devices} device(s), --matmul_size={size})"
    )
    return Need(total, what, "--matmul_size")


# Generation keeps, per character drawn, its random key and the scan's bookkeeping (12 bytes)
# and, per sample, the int32 character twice (the scan's output and its transpose): XLA's memory
# plan of `generate` holds exactly that (tests/test_bench.py).
KEY_BYTES, TOKEN_COPIES = 12, 2


def generation_need(batch: int, length: int) -> Need:
    """`lstm_jax.generate.generate` of `batch` samples of `length` characters."""
    total = length * (KEY_BYTES + TOKEN_COPIES * 4 * batch)
    what = (
        f"about {_gib(total)} for generation ({batch} samples of --generate_length={length} "
        "characters: their random keys and characters)"
    )
    return Need(total, what, "--generate_length")


def refuse_beyond_memory(needs: list[Need]) -> None:
    """One `UsageError` naming every need (each a phase, run one after another, so compared
    apart) above the machine's RAM, and the flags to lower. An accelerator has less memory than
    that, so this only catches the clearly impossible; what fits in RAM but not on the device is
    left to XLA's own out-of-memory error."""
    memory = physical_memory_bytes()
    over = [need for need in needs if memory is not None and need.size > memory]
    if over:
        raise UsageError(
            f"These sizes need more than this machine's {_gib(memory)} of memory: "
            f"{'; '.join(need.what for need in over)}. "
            f"Lower {' and '.join(need.lower for need in over)}."
        )


def refuse_sizes_beyond_memory(config: Config, vocab_size: int) -> None:
    """A `UsageError` naming the sizes to lower where a training step (`training_need`) needs
    more than the machine's RAM."""
    refuse_beyond_memory([training_need(config, vocab_size)])
