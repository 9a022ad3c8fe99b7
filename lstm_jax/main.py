"""Train a character LSTM (by default on Dracula), checkpoint it, and print a sample.

    python -m lstm_jax.main --hidden=512
    python -m lstm_jax.main --flagfile=experiments/smoke.flags --workdir=/tmp/smoke

Running the same command again resumes from the workdir. On a TPU pod every host runs the same
command (launch/tpu.sh); `launch/local.sh 2 ...` runs it as 2 processes on one machine.
Intentionally short: the loop lives in `lstm_jax.train`, which tests call with a `Config`.
"""

from __future__ import annotations

import jax
from absl import logging

from lstm_jax import cli, corpus, distributed, finetune, train
from lstm_jax.config import Config, ModelConfig
from lstm_jax.distributed import DistributedOptions


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.INFO)
    with cli.user_errors():
        cli.refuse_positional_arguments(argv)
        config = cli.read_flags(Config)
        config.validate()
        job = cli.read_flags(DistributedOptions)  # Its numbers checked, before any download.
        corpus.source_files(config.data)  # A bad --data_path or download: before any write.
        # Before anything touches a device: JAX refuses to join a job after that.
        distributed.initialize(job)
        if jax.process_index() != 0:
            logging.set_verbosity(logging.WARNING)  # One voice per job; warnings from all.
        logging.info(
            "JAX %s: process %d of %d, %d local device(s), %d in all: %s",
            jax.__version__,
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
            jax.local_devices()[0].device_kind,
        )
        if config.init.init_from:  # Refused before anything is written in the workdir.
            config = finetune.prepare(config, cli.given_settings(ModelConfig))
            cli.set_flags(config.model)  # flags.txt holds the checkpoint's model settings.
        # flags.txt is written once the run is accepted (train_and_evaluate checks the workdir).
        train.train_and_evaluate(config, flagfile=cli.flagfile_text(Config))


if __name__ == "__main__":
    cli.run(main, [Config, DistributedOptions])
