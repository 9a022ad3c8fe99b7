"""The checks of settings that need more than one setting, run by `Config.validate` once every
setting is in its range: combinations that cannot train, said in one line each."""

from __future__ import annotations

from typing import Any

from lstm_jax.errors import UsageError


def check_combinations(config: Any) -> None:
    """The checks of a `Config` that need more than one setting (each is in its range by now)."""
    from lstm_jax.blocks import refuse_what_the_block_cannot_do
    from lstm_jax.cells import CELLS, refuse_what_the_cell_cannot_do

    model, data = config.model, config.data
    if data.val_fraction + data.test_fraction >= 1.0:
        raise UsageError(
            f"--val_fraction={data.val_fraction} and --test_fraction={data.test_fraction} "
            "leave no training text; their sum must be below 1."
        )
    if config.optim.num_steps == 0 and not config.optim.num_epochs > 0:
        raise UsageError("Set --num_steps or a positive --num_epochs.")
    if config.init.extend_vocab and not config.init.init_from:
        raise UsageError("--extend_vocab extends a checkpoint's vocabulary; it needs --init_from.")
    if config.optim.weight_decay > 0 and config.optim.optimizer != "adamw":
        raise UsageError("--weight_decay needs --optimizer=adamw.")
    if model.cell not in CELLS:  # Cells may register after the flags are defined.
        raise UsageError(f"--cell must be one of {', '.join(CELLS)}, got {model.cell!r}.")
    refuse_what_the_cell_cannot_do(config)
    refuse_what_the_block_cannot_do(config)
    if model.tie_embeddings and model.embed_dim != model.hidden:
        raise UsageError(
            "--tie_embeddings needs --embed_dim equal to --hidden (the output layer reuses the "
            f"embedding table), got --embed_dim={model.embed_dim} and --hidden={model.hidden}."
        )
