"""Generate text from a trained run: `python -m lstm_jax.sample`.

    python -m lstm_jax.sample --workdir=runs/dracula_2x512 --prompt="Jonathan" \\
        --length=500 --temperature=0.8 --checkpoint=best --num_samples=3

The model (its settings, vocabulary and parameters) comes from the checkpoint; the sampler
itself is `lstm_jax.generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax

from lstm_jax import cli
from lstm_jax.config import SampleConfig, section, setting


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """sampling: which checkpoint, how many samples, how they are drawn"""

    workdir: str = setting("runs/default", "Run folder of the model to sample from.")
    checkpoint: str = setting("best", "Checkpoint to sample from: latest, best or a step number.")
    seed: int = setting(0, "Seed of the random draws: the same seed gives the same text.")
    top_k: int = setting(0, "Sample from the k most likely characters; 0: all.")
    num_samples: int = setting(1, "Samples to generate at once.")
    unknown: str = setting(
        "error",
        "Prompt characters outside the vocabulary: stop with an error, or skip them.",
        choices=("error", "skip"),
    )
    sample: SampleConfig = section(SampleConfig)


def main(argv: list[str]) -> None:
    with cli.user_errors():
        cli.refuse_positional_arguments(argv)
        options = cli.read_flags(SampleOptions)
        from lstm_jax.checkpoint import Checkpoints, abstract_like
        from lstm_jax.data import Vocab
        from lstm_jax.generate import check_sampling_args, sample_text
        from lstm_jax.models import init_params, model_from_settings

        checkpoints = Checkpoints(options.workdir, read_only=True)
        step = checkpoints.resolve(options.checkpoint)
        meta = checkpoints.read_meta(step)
        vocab = Vocab(meta["vocab"])
        text_options = options.sample
        check_sampling_args(
            text_options.length, text_options.temperature, options.top_k, vocab.size
        )
        model = model_from_settings(meta["settings"], vocab.size)
        abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
        device = jax.local_devices()[0]
        params = checkpoints.restore_params(
            step, abstract_like(abstract, jax.sharding.SingleDeviceSharding(device))
        )
        texts = sample_text(
            model,
            params,
            vocab,
            text_options.prompt,
            length=text_options.length,
            temperature=text_options.temperature,
            top_k=options.top_k,
            num_samples=options.num_samples,
            seed=options.seed,
            unknown=options.unknown,
        )
        print(
            f"# step {step}, validation {meta.get('val_bpc', float('nan')):.3f} bpc",
            file=sys.stderr,
        )
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- sample {i + 1} ---")
            print(text_options.prompt + text)


if __name__ == "__main__":
    cli.run(main, [SampleOptions])
