"""`ModelConfig`: the settings that fix the parameters' shapes and meaning.

A section of `lstm_jax.config.Config` (and re-exported there), in a module of its own because
every new cell or block adds its settings here: `--mogrifier_rounds` is the example.
"""

from __future__ import annotations

import dataclasses

from lstm_jax.settings import NON_NEGATIVE, POSITIVE, Range, setting


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Settings that fix the parameters' shapes and meaning: a checkpoint fits only these.

    Saved with every checkpoint (as a dict); the model takes this dataclass whole. A new
    setting's default must keep the behaviour from before it existed: older checkpoints, which
    lack it, are read with the default.
    """

    cell: str = setting(
        "lstm",
        "Recurrent cell of every layer, a key of lstm_jax.cells.CELLS (lstm is "
        "nn.OptimizedLSTMCell).",
    )
    embed_dim: int = setting(
        64, "Character embedding size; 0: one-hot characters, no table.", within=NON_NEGATIVE
    )
    hidden: int = setting(512, "Units (cell width) per layer.", within=POSITIVE)
    num_layers: int = setting(2, "Number of stacked layers.", within=POSITIVE)
    residual: bool = setting(
        False, "Residual connections: add each layer's input to its output, from layer 2 on."
    )
    layer_norm: bool = setting(False, "LayerNorm on every layer's output (over features).")
    tie_embeddings: bool = setting(
        False,
        "Output layer = the embedding table transposed, plus a bias; needs embed_dim == hidden.",
    )
    mogrifier_rounds: int = setting(
        5, "--cell=mogrifier: rounds of mutual gating of the input and the state before each "
        "step (0: a plain LSTM).", within=NON_NEGATIVE,
    )  # fmt: skip
    mogrifier_rank: int = setting(
        0, "--cell=mogrifier: rank of each round's gating matrix (a product of two thin ones); "
        "0: full rank.", within=NON_NEGATIVE,
    )  # fmt: skip
    # --- Blocks and the RG-LRU cell (issue 27, items 4 and 2) ----------------------------------
    block: str = setting(
        "plain", "How each layer wraps its cell, a key of lstm_jax.blocks.BLOCKS. plain: the cell "
        "alone (with --residual, --layer_norm); prenorm: x + cell(norm(x)), then x + "
        "MLP(norm(x)), a gated MLP on a --hidden-wide residual stream.",
    )  # fmt: skip
    mlp_ratio: float = setting(
        0.0, "--block=prenorm: width of the gated MLP as a multiple of --hidden; 0: 3 "
        "(Griffin's).", within=NON_NEGATIVE,
    )  # fmt: skip
    rglru_conv_width: int = setting(
        4, "--cell=rglru: characters the causal Conv1D before the RG-LRU sees, the current one "
        "included (the last width - 1 of its inputs are carried).", within=Range(2, 64),
    )  # fmt: skip
    # --- The mLSTM and attention cells (issue 27, items 1 and 3) -------------------------------
    mlstm_heads: int = setting(
        0, "--cell=mlstm: heads, each with its own matrix memory of (hidden / heads)^2; must "
        "divide --hidden; 0: 4 where 4 divides --hidden, else 1.", within=Range(0, 4096),
    )  # fmt: skip
    mlstm_chunk: int = setting(
        0, "--cell=mlstm: characters per chunk of the chunkwise training form (linear in "
        "--seq_len, quadratic in the chunk); 0: the whole sequence at once (the parallel form).",
        within=NON_NEGATIVE,
    )  # fmt: skip
    mlstm_forget: str = setting(
        "sigmoid", "--cell=mlstm: the forget gate, sigmoid (xLSTM's default) or exponential.",
        choices=("sigmoid", "exponential"),
    )  # fmt: skip
    attention_window: int = setting(
        0, "--cell=attention: characters each position attends to, itself included (the keys "
        "and values of the last this many are carried); 0: 128.", within=Range(0, 65536),
    )  # fmt: skip
    attention_heads: int = setting(
        0, "--cell=attention: heads; must divide --hidden; 0: 4 where 4 divides --hidden, "
        "else 1.", within=Range(0, 4096),
    )  # fmt: skip
