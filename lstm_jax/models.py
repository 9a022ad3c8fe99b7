"""The character model: Embed -> stacked recurrent cells scanned over time -> Dense.

The cell is pluggable (`--cell`, see `lstm_jax.cells`); the default is `nn.OptimizedLSTMCell`.
The module takes the recurrent state (one carry per layer, whatever pytree the cell keeps) and
returns the new one, so training can carry state from batch to batch and sampling can advance
one character at a time with the same parameters. The ablation switches (residual connections,
layer norm on layer outputs, one-hot input, tied embeddings, where dropout goes) live here,
around the cells, so every cell gets them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells import CELLS
from lstm_jax.config import Config, complete_settings

Carry = tuple[Any, ...]  # One carry per layer; for the LSTM a (c, h) pair, each [batch, hidden].


class CharLSTM(nn.Module):
    """The character language model; the name predates the cell registry."""

    vocab_size: int
    embed_dim: int = 64  # 0: one-hot characters in, no embedding table.
    hidden: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    cell: str = "lstm"  # A key of lstm_jax.cells.CELLS.
    residual: bool = False  # Add each layer's input to its output, from the second layer on.
    layer_norm: bool = False  # LayerNorm on each layer's output.
    tie_embeddings: bool = False  # Logits from the embedding table (needs embed_dim == hidden).
    dropout_at: str = "between"  # "between": between layers and before the output; "output".
    variational_dropout: bool = False  # One dropout mask per sequence, shared over time.
    dtype: str = "float32"  # Compute dtype of the matmuls; parameters and carry stay float32.
    remat: bool = False  # Recompute each time step in the backward pass (cells that step).

    @nn.compact
    def __call__(
        self, carry: Carry, tokens: jax.Array, *, deterministic: bool = True
    ) -> tuple[Carry, jax.Array]:
        """tokens int [batch, time] -> (new carry, logits float32 [batch, time, vocab])."""
        dtype = jnp.dtype(self.dtype)
        # Only non-default dtypes are passed on: the cells without a dtype field (lstm_ln,
        # slstm, minlstm) compute in float32, and Config.validate refuses others for them.
        cell_options = {} if dtype == jnp.float32 else {"dtype": dtype}
        scan_options = {"remat": True} if self.remat else {}  # Only cells that step take it.
        embed = None
        if self.embed_dim:
            embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=dtype, name="embed")
            x = embed(tokens)
        else:
            x = jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)
        # Variational ("locked") dropout: the mask is broadcast over the time axis, so a
        # dropped unit stays dropped for the whole sequence (Gal & Ghahramani, 2016).
        time_axis = (1,) if self.variational_dropout else ()
        cell_type = CELLS[self.cell]
        new_carry = []
        for layer in range(self.num_layers):
            layer_input = x
            if layer > 0 and self.dropout_at == "between":
                # Outside the scan: one mask per character, or per sequence (variational).
                layer_input = nn.Dropout(self.dropout, broadcast_dims=time_axis)(
                    x, deterministic=deterministic
                )
            layer_carry, y = cell_type(
                self.hidden, name=f"{self.cell}_{layer}", **cell_options
            ).scan(carry[layer], layer_input, **scan_options)
            if self.layer_norm:
                y = nn.LayerNorm(dtype=dtype, name=f"norm_{layer}")(y)
            if self.residual and layer > 0:
                y = y + x  # The undropped input: dropout acts on the branch, not the skip.
            x = y
            new_carry.append(layer_carry)
        x = nn.Dropout(self.dropout, broadcast_dims=time_axis)(x, deterministic=deterministic)
        if self.tie_embeddings:
            bias = self.param("logits_bias", nn.initializers.zeros_init(), (self.vocab_size,))
            logits = embed.attend(x) + bias
        else:
            logits = nn.Dense(self.vocab_size, dtype=dtype, name="logits")(x)
        return tuple(new_carry), logits.astype(jnp.float32)

    def initialize_carry(self, batch_size: int) -> Carry:
        # parent=None: a free-standing cell, only asked for its zero state.
        cell = CELLS[self.cell](self.hidden, parent=None)
        return tuple(cell.init_carry(batch_size) for _ in range(self.num_layers))


def build_model(config: Config, vocab_size: int) -> CharLSTM:
    return CharLSTM(
        vocab_size=vocab_size,
        embed_dim=config.embed_dim,
        hidden=config.hidden,
        num_layers=config.num_layers,
        dropout=config.dropout,
        cell=config.cell,
        residual=config.residual,
        layer_norm=config.layer_norm,
        tie_embeddings=config.tie_embeddings,
        dropout_at=config.dropout_at,
        variational_dropout=config.variational_dropout,
        dtype=config.dtype,
        remat=config.remat,
    )


def model_from_settings(settings: dict[str, Any], vocab_size: int) -> CharLSTM:
    """The model a checkpoint was trained with, from its saved settings (dropout off)."""
    settings = complete_settings(settings)  # Checkpoints from before a setting existed.
    return CharLSTM(
        vocab_size=vocab_size,
        embed_dim=settings["embed_dim"],
        hidden=settings["hidden"],
        num_layers=settings["num_layers"],
        cell=settings["cell"],
        residual=settings["residual"],
        layer_norm=settings["layer_norm"],
        tie_embeddings=settings["tie_embeddings"],
    )


def init_params(model: CharLSTM, rng: jax.Array) -> Any:
    carry = model.initialize_carry(1)
    return model.init(rng, carry, jnp.zeros((1, 1), jnp.int32))["params"]


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
