"""The character model: Embed -> stacked recurrent cells scanned over time -> Dense.

The cell is pluggable (`--cell`, see `lstm_jax.cells`); the default is `nn.OptimizedLSTMCell`.
The module takes the recurrent state (one carry per layer, whatever pytree the cell keeps) and
returns the new one, so training can carry state from batch to batch and sampling can advance
one character at a time with the same parameters. The ablation switches (residual connections,
layer norm on layer outputs, one-hot input, tied embeddings, where dropout goes) live here,
around the cells, so every cell gets them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells import CELLS
from lstm_jax.config import (
    ComputeConfig,
    Config,
    ModelConfig,
    RegularizationConfig,
    model_config_from_settings,
)

Carry = tuple[Any, ...]  # One carry per layer; for the LSTM a (c, h) pair, each [batch, hidden].


class CharLSTM(nn.Module):
    """The character language model; the name predates the cell registry.

    `config` fixes the parameters (a checkpoint saves it); `regularization` acts in training
    only (`deterministic=False`); `compute` changes how, not what, it computes.
    """

    config: ModelConfig
    vocab_size: int
    regularization: RegularizationConfig = RegularizationConfig()
    compute: ComputeConfig = ComputeConfig()

    @nn.compact
    def __call__(
        self, carry: Carry, tokens: jax.Array, *, deterministic: bool = True
    ) -> tuple[Carry, jax.Array]:
        """tokens int [batch, time] -> (new carry, logits float32 [batch, time, vocab])."""
        config, reg = self.config, self.regularization
        dtype = jnp.dtype(self.compute.dtype)
        # Only non-default dtypes are passed on: the cells without a dtype field (lstm_ln,
        # slstm, minlstm) compute in float32, and Config.validate refuses others for them.
        cell_options = {} if dtype == jnp.float32 else {"dtype": dtype}
        scan_options = {"remat": True} if self.compute.remat else {}  # Only cells that step.
        embed = None
        if config.embed_dim:
            embed = nn.Embed(self.vocab_size, config.embed_dim, dtype=dtype, name="embed")
            x = embed(tokens)
        else:
            x = jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)
        train = not deterministic
        if train and reg.embed_dropout:
            # One keep/drop draw per character of the vocabulary, for all its occurrences.
            keep = jax.random.bernoulli(
                self.make_rng("dropout"), 1.0 - reg.embed_dropout, (self.vocab_size,)
            )
            x = x * (keep[tokens] / (1.0 - reg.embed_dropout))[..., None].astype(x.dtype)
        # Variational ("locked") dropout: the mask is broadcast over the time axis, so a
        # dropped unit stays dropped for the whole sequence (Gal & Ghahramani, 2016).
        time_axis = (1,) if reg.variational_dropout else ()
        if reg.input_dropout:  # Named, and only when on: the other dropouts keep their names
            # (Dropout_0, ...), from which their masks are drawn, so old runs replay exactly.
            x = nn.Dropout(reg.input_dropout, broadcast_dims=time_axis, name="input_dropout")(
                x, deterministic=not train
            )
        cell_type = CELLS[config.cell]
        cell_options = {**cell_options, **CELLS[config.cell].options(config)}
        new_carry = []
        for layer in range(config.num_layers):
            layer_input = x
            if layer > 0 and reg.dropout_at == "between":
                # Outside the scan: one mask per character, or per sequence (variational).
                layer_input = nn.Dropout(reg.dropout, broadcast_dims=time_axis)(
                    x, deterministic=deterministic
                )
            layer_cell = cell_type
            if train and reg.weight_drop:  # A mask of its own for every layer.
                layer_cell = _with_weight_drop(cell_type, self, reg.weight_drop)
            layer_carry, y = layer_cell(
                config.hidden, name=f"{config.cell}_{layer}", **cell_options
            ).scan(carry[layer], layer_input, **scan_options)
            if config.layer_norm:
                y = nn.LayerNorm(dtype=dtype, name=f"norm_{layer}")(y)
            if config.residual and layer > 0:
                y = y + x  # The undropped input: dropout acts on the branch, not the skip.
            x = y
            new_carry.append(layer_carry)
        x = nn.Dropout(reg.dropout, broadcast_dims=time_axis)(x, deterministic=deterministic)
        if config.tie_embeddings:
            bias = self.param("logits_bias", nn.initializers.zeros_init(), (self.vocab_size,))
            logits = embed.attend(x) + bias
        else:
            logits = nn.Dense(self.vocab_size, dtype=dtype, name="logits")(x)
        return tuple(new_carry), logits.astype(jnp.float32)

    def initialize_carry(self, batch_size: int) -> Carry:
        # parent=None: a free-standing cell, only asked for its zero state.
        cell = free_cell(self.config)
        return tuple(cell.init_carry(batch_size) for _ in range(self.config.num_layers))


def free_cell(config: ModelConfig) -> Any:
    """An unbound cell of the model's kind and width: for its zero state and its FLOPs."""
    cell_type = CELLS[config.cell]
    return cell_type(config.hidden, parent=None, **cell_type.options(config))


def _with_weight_drop(cell_type: type, parent: nn.Module, rate: float) -> type:
    """`cell_type` whose recurrent kernels are multiplied by a fresh DropConnect mask (scaled by
    1 / (1 - rate)) each time the model is applied: one mask per optimizer step, shared by all
    time steps and sequences (AWD-LSTM's WeightDrop). Parameter names and shapes are unchanged."""
    key = parent.make_rng("dropout")

    def drop(variables: dict) -> dict:
        params = flax.core.unfreeze(variables["params"])
        for number, path in enumerate(cell_type.recurrent_kernels):
            *scopes, leaf = path.split("/")
            holder = functools.reduce(lambda tree, name: tree[name], scopes, params)
            kernel = holder[leaf]
            keep = jax.random.bernoulli(jax.random.fold_in(key, number), 1.0 - rate, kernel.shape)
            holder[leaf] = jnp.where(keep, kernel / (1.0 - rate), 0.0).astype(kernel.dtype)
        return {**variables, "params": params}

    return nn.map_variables(
        cell_type, "params", trans_in_fn=drop, init=parent.is_initializing(), methods=["scan"]
    )


def build_model(config: Config, vocab_size: int) -> CharLSTM:
    """The model a run trains, with its regularisers and compute options."""
    return CharLSTM(config.model, vocab_size, config.regularization, config.compute)


def model_from_settings(settings: dict[str, Any], vocab_size: int) -> CharLSTM:
    """The model a checkpoint was trained with, from its saved settings (for evaluation)."""
    return CharLSTM(model_config_from_settings(settings), vocab_size)


def init_params(model: CharLSTM, rng: jax.Array) -> Any:
    carry = model.initialize_carry(1)
    return model.init(rng, carry, jnp.zeros((1, 1), jnp.int32))["params"]


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def forward_flops_per_char(config: ModelConfig, vocab_size: int) -> int:
    """Forward matmul FLOPs for one character (a multiply-add counts 2), counted analytically.

    Each layer's cell counts its own step (`Cell.flops_per_step`), with the embedding as the
    first layer's input (or the one-hot characters, vocab_size wide, when embed_dim is 0) and
    the layer below's output after that; the output layer adds hidden * vocab_size * 2 (tied or
    not). The embedding lookup, layer norms, residual adds and dropout are not matmuls and are
    not counted. Training takes about 3x this (each matmul's backward is two matmuls).
    """
    cell = free_cell(config)
    input_dim, flops = config.embed_dim or vocab_size, 0
    for _ in range(config.num_layers):
        flops += cell.flops_per_step(input_dim)
        input_dim = config.hidden
    return flops + 2 * config.hidden * vocab_size
