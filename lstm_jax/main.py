"""Train a character LSTM (by default on Dracula), checkpoint it, and print a sample.

    python -m lstm_jax.main --hidden=512
    python -m lstm_jax.main --flagfile=experiments/smoke.flags --workdir=/tmp/smoke

Intentionally short: the logic lives in `lstm_jax.train`, which tests call with a `Config`.
"""

from __future__ import annotations

from pathlib import Path

import jax
from absl import logging

from lstm_jax import cli, train


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.INFO)
    with cli.user_errors():
        cli.refuse_positional_arguments(argv)
        config = cli.config_from_flags()
        config.validate()
        logging.info(
            "JAX %s: process %d of %d, %d local device(s): %s",
            jax.__version__,
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.local_devices()[0].device_kind,
        )
        workdir = Path(config.workdir).expanduser()
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "flags.txt").write_text(cli.flagfile_text())
        train.train_and_evaluate(config)


if __name__ == "__main__":
    cli.run(main)
