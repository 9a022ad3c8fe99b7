"""Generate text from a trained run: `python -m lstm_jax.sample`.

    python -m lstm_jax.sample --workdir=runs/dracula_2x512 --prompt="Jonathan" \\
        --length=500 --temperature=0.8 --checkpoint=best --num_samples=3

The model (its settings, vocabulary and parameters) comes from the checkpoint; the sampler
itself is `lstm_jax.generate`. Text is printed as it is generated (the first sample; any others
follow when it is done), and is the same text, character for character, as in one piece.
"""

from __future__ import annotations

import dataclasses
import math
import sys

from lstm_jax import cli
from lstm_jax.config import SampleConfig, section, setting
from lstm_jax.errors import UsageError, argument
from lstm_jax.reader import MEMBER_HELP, member_note
from lstm_jax.settings import NON_NEGATIVE, POSITIVE, SEED, Range, check_choices, check_ranges


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """sampling: which checkpoint, how many samples, how they are drawn"""

    workdir: str = setting("runs/default", "Run folder of the model to sample from.")
    checkpoint: str = setting("best", "Checkpoint to sample from: latest, best or a step number.")
    member: str = setting("", MEMBER_HELP)
    seed: int = setting(
        0, "Seed of the random draws: the same seed gives the same text; 32 bits, what JAX's "
        "random keys hold.", within=SEED,
    )  # fmt: skip
    top_k: int = setting(
        0, "Sample from the k most likely characters (at most the vocabulary's size); 0: all.",
        within=NON_NEGATIVE,
    )  # fmt: skip
    top_p: float = setting(
        1.0, "Nucleus sampling: draw from the fewest most likely characters whose probability "
        "reaches p (after --temperature and --top_k); 1: off.", within=Range(0, 1, low_open=True),
    )  # fmt: skip
    stop: str = setting(
        "", "End each sample at the first occurrence of this text in it, which is printed "
        "(included). Not given: no stop. A newline from bash: --stop=$'\\n'."
    )  # fmt: skip
    prompt_file: str = setting(
        "", "UTF-8 file whose whole text (newlines included) is the prompt, instead of --prompt."
    )
    num_samples: int = setting(1, "Samples to generate at once.", within=POSITIVE)
    unknown: str = setting(
        "error",
        "Prompt characters outside the vocabulary: stop with an error, or skip them.",
        choices=("error", "skip"),
    )
    sample: SampleConfig = section(SampleConfig)


def check_sampling_args(options: SampleOptions, vocab_size: int) -> None:
    """Raise `UsageError` naming the first impossible sampling setting: one outside its range
    or its choices, or a top_k above the vocabulary's size."""
    check_choices(options)  # The command line's are checked by absl; Python's are not.
    check_ranges(options)
    if options.top_k > vocab_size:
        raise UsageError(
            f"{argument('top_k')} must be 0 (off) or in [1, {vocab_size}] (the vocabulary), got "
            f"{options.top_k}."
        )


def read_prompt(options: SampleOptions, stop_given: bool = False) -> str:
    """The prompt (from --prompt or --prompt_file), after checking the flags that need no model
    (the numbers are checked when the flags are read)."""
    if stop_given and not options.stop:
        raise UsageError("--stop must not be empty; leave the flag out for no stop.")
    if not options.prompt_file:
        return options.sample.prompt
    if options.sample.prompt:
        raise UsageError("--prompt and --prompt_file both give the prompt; pass only one.")
    return cli.read_utf8_flag("prompt_file", options.prompt_file)


def main(argv: list[str]) -> None:
    with cli.user_errors():
        cli.refuse_positional_arguments(argv)
        options = cli.read_flags(SampleOptions)
        prompt = read_prompt(options, stop_given=bool(cli.FLAGS["stop"].present))
        from lstm_jax.generate import stream_text
        from lstm_jax.reader import restore_model

        model, params, vocab, step, meta = restore_model(
            options.workdir, options.checkpoint, options.member
        )
        check_sampling_args(options, vocab.size)
        text_options = options.sample
        pieces = stream_text(
            model,
            params,
            vocab,
            prompt,
            length=text_options.length,
            temperature=text_options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            num_samples=options.num_samples,
            seed=options.seed,
            unknown=options.unknown,
            stop=options.stop,
        )
        val_loss = meta.get("selected_val_loss", meta.get("val_loss", float("nan")))
        which = ", EMA parameters" if meta.get("selected") == "ema_params" else ""
        print(
            f"# step {step}, validation {val_loss / math.log(2):.3f} bpc{which}{member_note(meta)}",
            file=sys.stderr,
        )
        print_as_generated(pieces, prompt, options.num_samples)


def print_as_generated(pieces, prompt: str, num_samples: int) -> None:
    """Each sample as `prompt + text`, the first one piece by piece as the pieces come."""
    texts = [""] * num_samples
    for number, row_pieces in enumerate(pieces):
        if number == 0:  # Only now: a bad prompt is refused before anything is printed.
            print("--- sample 1 ---\n" if num_samples > 1 else "", end="")
            print(prompt, end="", flush=True)
        print(row_pieces[0], end="", flush=True)
        texts = [text + piece for text, piece in zip(texts, row_pieces, strict=True)]
    print()
    for i, text in enumerate(texts[1:], start=2):
        print(f"--- sample {i} ---")
        print(prompt + text)


if __name__ == "__main__":
    cli.run(main, [SampleOptions])
