"""The character model: Embed -> stacked recurrent cells scanned over time -> Dense.

The cell is pluggable (`--cell`, see `lstm_jax.cells`); the default is `nn.OptimizedLSTMCell`.
The module takes the recurrent state (one carry per layer, whatever pytree the cell keeps) and
returns the new one, so training can carry state from batch to batch and sampling can advance
one character at a time with the same parameters. The ablation switches (residual connections,
layer norm on layer outputs, one-hot input, tied embeddings, where dropout goes) act around
the cells, so every cell gets them; how each layer wraps its cell is the block (`--block`,
`lstm_jax.blocks`: plain, which holds the residual and layer-norm switches, or a pre-norm
residual block with an MLP). The layers run
one scan each (`--scan=layered`) or together as one wavefront scan (`--scan=wavefront`,
`lstm_jax.wavefront`), with the same parameters and random draws.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.blocks import BLOCKS
from lstm_jax.cells import CELLS
from lstm_jax.config import (
    ComputeConfig,
    Config,
    ModelConfig,
    RegularizationConfig,
    model_config_from_settings,
)
from lstm_jax.wavefront import wavefront_scan

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
        self,
        carry: Carry,
        tokens: jax.Array,
        *,
        deterministic: bool = True,
        keep: dict[str, jax.Array] | None = None,
        return_hidden: bool = False,
    ) -> tuple[Carry, jax.Array] | tuple[Carry, jax.Array, jax.Array]:
        """tokens int [batch, time] -> (new carry, logits float32 [batch, time, vocab]).

        keep: a population member's keep probabilities (1 - rate) of the dropouts, traced; None:
        the `regularization` constants. Which dropouts act is still `regularization`'s choice.
        return_hidden: also return the last layer's output, the output layer's input, float32
        [batch, time, hidden] (what `lstm_jax.cache` keys on), as a third item.
        """
        config, reg = self.config, self.regularization
        kept = functools.partial(_keep_probability, reg, keep)
        dtype = jnp.dtype(self.compute.dtype)
        # Only non-default dtypes are passed on: the cells without a dtype field (lstm_ln,
        # slstm, minlstm) compute in float32, and Config.validate refuses others for them.
        cell_options = {} if dtype == jnp.float32 else {"dtype": dtype}
        embed = None
        if config.embed_dim:
            embed = nn.Embed(self.vocab_size, config.embed_dim, dtype=dtype, name="embed")
            x = embed(tokens)
        else:
            x = jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)
        train = not deterministic
        if train and reg.embed_dropout:
            # One keep/drop draw per character of the vocabulary, for all its occurrences.
            kept_rows = jax.random.bernoulli(
                self.make_rng("dropout"), kept("embed_dropout"), (self.vocab_size,)
            )
            x = x * (kept_rows[tokens] / kept("embed_dropout"))[..., None].astype(x.dtype)
        # Variational ("locked") dropout: the mask is broadcast over the time axis, so a
        # dropped unit stays dropped for the whole sequence (Gal & Ghahramani, 2016).
        time_axis = (1,) if reg.variational_dropout else ()
        if reg.input_dropout:  # Named, and only when on: the other dropouts keep their names
            # (Dropout_0, ...), from which their masks are drawn, so old runs replay exactly.
            x = Dropout(reg.input_dropout, broadcast_dims=time_axis, name="input_dropout")(
                x, deterministic=not train, keep=keep and keep["input_dropout"]
            )
        cell_options = {**cell_options, **CELLS[config.cell].options(config)}
        # The wavefront reads the parameters that the layered path creates: init goes that way.
        layers = self._layered
        if self.compute.scan == "wavefront" and not self.is_initializing():
            layers = self._wavefront
        x, new_carry = layers(
            carry, x, train=train, time_axis=time_axis, options=cell_options, keep=keep
        )
        x = Dropout(reg.dropout, broadcast_dims=time_axis)(
            x, deterministic=deterministic, keep=keep and keep["dropout"]
        )
        if config.tie_embeddings:
            bias = self.param("logits_bias", nn.initializers.zeros_init(), (self.vocab_size,))
            logits = embed.attend(x) + bias
        else:
            logits = nn.Dense(self.vocab_size, dtype=dtype, name="logits")(x)
        if return_hidden:
            return tuple(new_carry), logits.astype(jnp.float32), x.astype(jnp.float32)
        return tuple(new_carry), logits.astype(jnp.float32)

    def _layered(
        self, carry: Carry, x: jax.Array, *, train: bool, time_axis: tuple[int, ...],
        options: dict, keep: dict | None,
    ) -> tuple[jax.Array, Carry]:  # fmt: skip
        """The stack as one scan per layer, each over the whole sequence (`--scan=layered`),
        each layer's cell wrapped in the `--block` (`lstm_jax.blocks`)."""
        config, reg = self.config, self.regularization
        cell_type = CELLS[config.cell]
        scan_options = {"remat": True} if self.compute.remat else {}  # Only cells that step.
        if self.compute.unroll != 1:
            scan_options["unroll"] = self.compute.unroll
        if self.compute.hoist_input:  # Only the cells that hoist; init takes the plain path.
            scan_options["hoist_input"] = True

        def drop(y: jax.Array) -> jax.Array:
            return Dropout(reg.dropout, broadcast_dims=time_axis)(
                y, deterministic=not train, keep=keep and keep["dropout"]
            )

        block = BLOCKS[config.block](
            config, jnp.dtype(self.compute.dtype), drop, reg.dropout_at == "between"
        )
        x, new_carry = block.enter(x), []
        for layer in range(config.num_layers):
            layer_cell = cell_type
            if train and reg.weight_drop:  # A mask of its own for every layer.
                keep_weight = _keep_probability(reg, keep, "weight_drop")
                layer_cell = _with_weight_drop(cell_type, self, keep_weight)
            cell = layer_cell(config.hidden, name=f"{config.cell}_{layer}", **options)
            layer_carry, x = block.layer(layer, cell, carry[layer], x, **scan_options)
            new_carry.append(layer_carry)
        return block.leave(x), tuple(new_carry)

    def _wavefront(
        self, carry: Carry, x: jax.Array, *, train: bool, time_axis: tuple[int, ...],
        options: dict, keep: dict | None,
    ) -> tuple[jax.Array, Carry]:  # fmt: skip
        """The same stack as one scan over time (`--scan=wavefront`, `lstm_jax.wavefront`): the
        layered path's parameters, read by name, and its random draws, in the same order."""
        config, reg = self.config, self.regularization
        cell_type, params = CELLS[config.cell], self.variables["params"]
        # Free modules, applied to their parameters as pure functions inside the jax.lax.scan.
        cell = cell_type(config.hidden, parent=None, **options)
        norm = nn.LayerNorm(dtype=jnp.dtype(self.compute.dtype), parent=None)
        steps, masks = [], []
        for layer in range(config.num_layers):
            mask = None
            if layer > 0 and reg.dropout_at == "between":
                # The layered path's Dropout module (same name, same key), applied to ones: its
                # mask, for the whole sequence, handed to the scan step by step.
                ones = jnp.ones((*x.shape[:2], config.hidden), jnp.float32)
                dropped = Dropout(reg.dropout, broadcast_dims=time_axis)(
                    ones, deterministic=not train, keep=keep and keep["dropout"]
                )
                mask = dropped > 0 if train and reg.dropout > 0 else None
            layer_params = params[f"{config.cell}_{layer}"]
            if train and reg.weight_drop:  # Drawn in the layered path's order.
                layer_params = drop_recurrent_kernels(
                    cell_type, layer_params, self.make_rng("dropout"),
                    _keep_probability(reg, keep, "weight_drop"),
                )  # fmt: skip
            masks.append(mask)
            steps.append(
                functools.partial(
                    self._layer_step, cell, norm, layer, layer_params, params.get(f"norm_{layer}"),
                    _keep_probability(reg, keep, "dropout"),
                )  # fmt: skip
            )
        carries, y = wavefront_scan(
            steps, carry, x, masks, remat=self.compute.remat, unroll=self.compute.unroll
        )
        return y, carries

    @nn.nowrap
    def _layer_step(
        self, cell: Any, norm: nn.Module, layer: int, params: Any, norm_params: Any,
        keep_probability: Any, carry: Any, x: jax.Array, keep: jax.Array | None,
    ) -> tuple[Any, jax.Array]:  # fmt: skip
        """One layer's time step in the wavefront, as `_layered` computes it: dropout on the
        input, the cell, layer norm, residual."""
        layer_input = x
        if keep is not None:  # nn.Dropout's arithmetic, so the results match to the bit.
            rate = self.regularization.dropout
            layer_input = (
                jnp.where(keep, x / keep_probability, 0) if rate < 1 else jnp.zeros_like(x)
            )
        carry, y = cell.apply({"params": params}, carry, layer_input)
        if self.config.layer_norm:
            y = norm.apply({"params": norm_params}, y)
        if self.config.residual and layer > 0:
            y = y + x
        return carry, y

    def initialize_carry(self, batch_size: int) -> Carry:
        # parent=None: a free-standing cell, only asked for its zero state.
        cell = free_cell(self.config)
        return tuple(cell.init_carry(batch_size) for _ in range(self.config.num_layers))


def free_cell(config: ModelConfig) -> Any:
    """An unbound cell of the model's kind and width: for its zero state and its FLOPs."""
    cell_type = CELLS[config.cell]
    return cell_type(config.hidden, parent=None, **cell_type.options(config))


def _with_weight_drop(cell_type: type, parent: nn.Module, keep: Any) -> type:
    """`cell_type` whose recurrent kernels are multiplied by a fresh DropConnect mask (scaled by
    1 / keep, keep = 1 - rate) each time the model is applied: one mask per optimizer step,
    shared by all time steps and sequences (AWD-LSTM's WeightDrop). Parameter names and shapes
    are unchanged."""
    key = parent.make_rng("dropout")

    def drop(variables: dict) -> dict:
        params = drop_recurrent_kernels(cell_type, variables["params"], key, keep)
        return {**variables, "params": params}

    return nn.map_variables(
        cell_type, "params", trans_in_fn=drop, init=parent.is_initializing(), methods=["scan"]
    )


def drop_recurrent_kernels(cell_type: type, params: Any, key: jax.Array, keep: Any) -> Any:
    """One cell's parameters with `--weight_drop`'s DropConnect mask on its recurrent kernels;
    `keep`: the probability of keeping a weight, 1 - rate."""
    params = flax.core.unfreeze(params)
    for number, path in enumerate(cell_type.recurrent_kernels):
        *scopes, leaf = path.split("/")
        holder = functools.reduce(lambda tree, name: tree[name], scopes, params)
        kernel = holder[leaf]
        kept = jax.random.bernoulli(jax.random.fold_in(key, number), keep, kernel.shape)
        holder[leaf] = jnp.where(kept, kernel / keep, 0.0).astype(kernel.dtype)
    return params


class Dropout(nn.Dropout):
    """`nn.Dropout` that can take its keep probability as a traced value (a population member's
    rate, `keep=`); without it, `nn.Dropout` itself. Same class name, so the same module names
    (Dropout_0, ...) and so the same random keys; the same arithmetic, so the same masks."""

    @nn.compact
    def __call__(
        self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None,
        keep: jax.Array | None = None,
    ) -> jax.Array:  # fmt: skip
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if keep is None:  # nn.Dropout.__call__, line for line.
            if self.rate == 0.0 or deterministic:
                return inputs
            if self.rate == 1.0:  # Prevent gradient NaNs in the 1.0 edge case.
                return jnp.zeros_like(inputs)
            keep = 1.0 - self.rate
        elif deterministic:
            return inputs
        rng = self.make_rng(self.rng_collection) if rng is None else rng
        broadcast_shape = list(inputs.shape)
        for dim in self.broadcast_dims:
            broadcast_shape[dim] = 1
        mask = jnp.broadcast_to(jax.random.bernoulli(rng, keep, broadcast_shape), inputs.shape)
        return jax.lax.select(mask, (inputs / keep).astype(inputs.dtype), jnp.zeros_like(inputs))


def _keep_probability(reg: RegularizationConfig, keep: dict | None, name: str) -> Any:
    """The keep probability of dropout `name`: the member's traced one, or 1 - the constant."""
    return 1.0 - getattr(reg, name) if keep is None else keep[name]


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

    The block counts the stack (`Block.flops`): each layer's cell counts its own step
    (`Cell.flops_per_step`), with the embedding as the stack's input (or the one-hot
    characters, vocab_size wide, when embed_dim is 0), plus the block's own matmuls (prenorm's
    MLPs and embedding projection); the output layer adds hidden * vocab_size * 2 (tied or not).
    The embedding lookup, norms, residual adds and dropout are not matmuls and are not counted;
    a cell's state is, where it is more than a vector (`state_flops_per_char`). Training
    takes about 3x this (each matmul's backward is two matmuls).
    """
    block = BLOCKS[config.block]
    flops = block.flops(config, free_cell(config), config.embed_dim or vocab_size)
    return flops + 2 * config.hidden * vocab_size


def state_flops_per_char(config: ModelConfig) -> int:
    """The part of `forward_flops_per_char` that no weight makes: the cells' own state (mlstm's
    matrix memory, attention over its window; `Cell.state_flops_per_step`), every layer."""
    return config.num_layers * free_cell(config).state_flops_per_step()
