"""The character model: Embed -> stacked `nn.OptimizedLSTMCell` scanned over time -> Dense.

The module takes the recurrent state (one `(c, h)` pair per layer) and returns the new one, so
training can carry state from batch to batch and sampling can advance one character at a time
with the same parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.config import Config

Carry = tuple[tuple[jax.Array, jax.Array], ...]  # One (c, h) per layer, each [batch, hidden].


class CharLSTM(nn.Module):
    vocab_size: int
    embed_dim: int = 64
    hidden: int = 512
    num_layers: int = 2
    dropout: float = 0.0

    @nn.compact
    def __call__(
        self, carry: Carry, tokens: jax.Array, *, deterministic: bool = True
    ) -> tuple[Carry, jax.Array]:
        """tokens int [batch, time] -> (new carry, logits float32 [batch, time, vocab])."""
        x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
        new_carry = []
        for layer in range(self.num_layers):
            if layer > 0:
                # Between layers; applied outside the scan, so every character gets its own mask.
                x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
            scan_lstm = nn.scan(
                nn.OptimizedLSTMCell,
                variable_broadcast="params",
                split_rngs={"params": False, "dropout": True},
                in_axes=1,
                out_axes=1,
            )
            layer_carry, x = scan_lstm(self.hidden, name=f"lstm_{layer}")(carry[layer], x)
            new_carry.append(layer_carry)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        logits = nn.Dense(self.vocab_size, name="logits")(x)
        return tuple(new_carry), logits.astype(jnp.float32)

    def initialize_carry(self, batch_size: int) -> Carry:
        zeros = jnp.zeros((batch_size, self.hidden), jnp.float32)
        return tuple((zeros, zeros) for _ in range(self.num_layers))


def build_model(config: Config, vocab_size: int) -> CharLSTM:
    return CharLSTM(
        vocab_size=vocab_size,
        embed_dim=config.embed_dim,
        hidden=config.hidden,
        num_layers=config.num_layers,
        dropout=config.dropout,
    )


def model_from_settings(settings: dict[str, Any], vocab_size: int) -> CharLSTM:
    """The model a checkpoint was trained with, from its saved settings (dropout off)."""
    return CharLSTM(
        vocab_size=vocab_size,
        embed_dim=settings["embed_dim"],
        hidden=settings["hidden"],
        num_layers=settings["num_layers"],
    )


def init_params(model: CharLSTM, rng: jax.Array) -> Any:
    carry = model.initialize_carry(1)
    return model.init(rng, carry, jnp.zeros((1, 1), jnp.int32))["params"]


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
