"""Blocks: how each layer of the stack wraps its cell, and the registry `--block` picks from.

A block is a class with four methods, which `lstm_jax.models.CharLSTM` calls in order:

    enter(x) -> x                    once, on the embedded characters, before the first layer
    layer(index, cell, carry, x,     each layer: the cell (already built, named
          **scan_options)                 `{cell}_{index}`) and whatever surrounds it
          -> (carry, y)
    leave(x) -> x                    once, after the last layer, before the output dropout
    flops(config, cell, input_dim)   forward matmul FLOPs of the whole stack for one character
                                     (a classmethod; `lstm_jax.bench` adds the output layer)

plus `refuse(config)`, a classmethod that raises `UsageError` for settings the block cannot
take, and `wavefront`, a class attribute: False where `--scan=wavefront` (which steps the plain
layer) cannot run it. Its modules are created in the model's own scope (a block is not a Flax
module), so `plain` keeps the parameter names of the model from before blocks existed, and a
block's own parameters are named by layer (`mlp_0`, ...). The carry is whatever the cell keeps:
a block never adds to it, so training, carried state, checkpoints and sampling work for every
block.

- `plain`: the cell alone, with the `--residual` and `--layer_norm` ablations, and `--dropout`
  between layers: the model as it always was, bit for bit.
- `prenorm`: the pre-norm residual block of Griffin (De et al., 2024) and of transformers:
  x + cell(norm(x)), then x + MLP(norm(x)), with RMSNorm and a gated MLP
  down(gelu(gate(x)) * up(x)) (GeGLU) of width `--mlp_ratio` x `--hidden`. The residual stream
  is `--hidden` wide: the embedding is projected to it once (`embed_projection`, only where
  `--embed_dim` differs), and a last RMSNorm (`final_norm`) precedes the output layer.

To add a block: one class here with those methods, and one line in `BLOCKS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.errors import UsageError

DEFAULT_MLP_RATIO = 3.0  # Griffin's MLP expansion, taken when --mlp_ratio is 0.


@dataclasses.dataclass(frozen=True)
class Block:
    """What every block is given: the model settings, the compute dtype, and `drop`, the
    model's `--dropout` (one module per call, its mask drawn as `--variational_dropout` says;
    the identity when dropout is off or in evaluation)."""

    config: Any  # The ModelConfig.
    dtype: Any
    drop: Callable[[jax.Array], jax.Array]
    dropout_between: bool  # --dropout_at=between: dropout acts inside the stack too.

    wavefront: ClassVar[bool] = True  # Whether `--scan=wavefront` can run it.

    @classmethod
    def refuse(cls, config: Any) -> None:
        """Raise `UsageError` for a `Config` this block cannot run; most blocks take any."""

    def enter(self, x: jax.Array) -> jax.Array:
        return x

    def layer(
        self, index: int, cell: Any, carry: Any, x: jax.Array, **scan_options: Any
    ) -> tuple[Any, jax.Array]:
        raise NotImplementedError(f"{type(self).__name__} must define layer(...).")

    def leave(self, x: jax.Array) -> jax.Array:
        return x

    @classmethod
    def flops(cls, config: Any, cell: Any, input_dim: int) -> int:
        """Forward matmul FLOPs of the stack for one character, `input_dim` wide into it."""
        raise NotImplementedError(f"{cls.__name__} must define flops(config, cell, input_dim).")


class PlainBlock(Block):
    """The cell alone: dropout on its input (from layer 2 on), `--layer_norm` on its output,
    `--residual` adds the layer's input (from layer 2 on)."""

    def layer(
        self, index: int, cell: Any, carry: Any, x: jax.Array, **scan_options: Any
    ) -> tuple[Any, jax.Array]:
        layer_input = x
        if index > 0 and self.dropout_between:
            # Outside the scan: one mask per character, or per sequence (variational).
            layer_input = self.drop(x)
        carry, y = cell.scan(carry, layer_input, **scan_options)
        if self.config.layer_norm:
            y = nn.LayerNorm(dtype=self.dtype, name=f"norm_{index}")(y)
        if self.config.residual and index > 0:
            y = y + x  # The undropped input: dropout acts on the branch, not the skip.
        return carry, y

    @classmethod
    def flops(cls, config: Any, cell: Any, input_dim: int) -> int:
        """Each layer's cell: the embedding (or one-hot) width into the first, `--hidden` after."""
        flops = 0
        for _ in range(config.num_layers):
            flops += cell.flops_per_step(input_dim)
            input_dim = config.hidden
        return flops


class GatedMLP(nn.Module):
    """down(gelu(gate(x)) * up(x)): GeGLU (Shazeer, 2020), as Griffin's MLP block."""

    width: int
    expanded: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = nn.Dense(self.expanded, dtype=self.dtype, name="gate")(x)
        up = nn.Dense(self.expanded, dtype=self.dtype, name="up")(x)
        return nn.Dense(self.width, dtype=self.dtype, name="down")(nn.gelu(gate) * up)


def mlp_width(config: Any) -> int:
    """The gated MLP's inner width: `--mlp_ratio` (0: `DEFAULT_MLP_RATIO`) times `--hidden`."""
    return max(1, round((config.mlp_ratio or DEFAULT_MLP_RATIO) * config.hidden))


class PreNormBlock(Block):
    """x + cell(norm(x)), then x + MLP(norm(x)). `--dropout` (with `--dropout_at=between`)
    drops each branch's output before its residual add; the stream itself is never dropped."""

    wavefront: ClassVar[bool] = False  # The wavefront steps the plain layer only.

    @classmethod
    def refuse(cls, config: Any) -> None:
        model = config.model
        if model.residual or model.layer_norm:
            flag = "--residual" if model.residual else "--layer_norm"
            raise UsageError(f"--block=prenorm has its own residual adds and norms; drop {flag}.")

    def _norm(self, name: str) -> nn.Module:
        return nn.RMSNorm(dtype=self.dtype, name=name)

    def _drop_branch(self, y: jax.Array) -> jax.Array:
        return self.drop(y) if self.dropout_between else y

    def enter(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] == self.config.hidden:
            return x
        return nn.Dense(self.config.hidden, dtype=self.dtype, name="embed_projection")(x)

    def layer(
        self, index: int, cell: Any, carry: Any, x: jax.Array, **scan_options: Any
    ) -> tuple[Any, jax.Array]:
        carry, y = cell.scan(carry, self._norm(f"cell_norm_{index}")(x), **scan_options)
        x = x + self._drop_branch(y)
        mlp = GatedMLP(self.config.hidden, mlp_width(self.config), self.dtype, name=f"mlp_{index}")
        y = mlp(self._norm(f"mlp_norm_{index}")(x))
        return carry, x + self._drop_branch(y)

    def leave(self, x: jax.Array) -> jax.Array:
        return self._norm("final_norm")(x)

    @classmethod
    def flops(cls, config: Any, cell: Any, input_dim: int) -> int:
        """The embedding projection (where there is one), then per layer the cell on the
        `--hidden`-wide stream and the MLP's three matmuls (gate, up, down)."""
        hidden = config.hidden
        flops = 2 * input_dim * hidden if input_dim != hidden else 0
        per_layer = cell.flops_per_step(hidden) + 3 * 2 * hidden * mlp_width(config)
        return flops + config.num_layers * per_layer


BLOCKS: dict[str, type[Block]] = {
    "plain": PlainBlock,
    "prenorm": PreNormBlock,
}


def refuse_what_the_block_cannot_do(config: Any) -> None:
    """Raise `UsageError` for an unknown `--block`, `--mlp_ratio` without a block that has an
    MLP, `--scan=wavefront` for a block without `wavefront`, and whatever the block's own
    `refuse` turns down."""
    model = config.model
    if model.block not in BLOCKS:
        raise UsageError(f"--block must be one of {', '.join(BLOCKS)}, got {model.block!r}.")
    if model.mlp_ratio and model.block != "prenorm":
        raise UsageError(
            "--mlp_ratio sizes --block=prenorm's MLP; add --block=prenorm or drop --mlp_ratio."
        )
    if config.compute.scan == "wavefront" and not BLOCKS[model.block].wavefront:
        runs = ", ".join(f"--block={name}" for name in BLOCKS if BLOCKS[name].wavefront)
        raise UsageError(f"--scan=wavefront runs {runs} only; drop one of them.")
    BLOCKS[model.block].refuse(config)
