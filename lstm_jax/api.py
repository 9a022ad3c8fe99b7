"""A trained model from Python: `lstm_jax.load(workdir)` -> generate text, score text.

    import lstm_jax

    model = lstm_jax.load("runs/dracula_2x512", checkpoint="best")
    print(model.generate("Jonathan", 200, temperature=0.8, top_p=0.95, seed=1, stop="\\n\\n"))
    print(model.score("The night was dark."))  # bits per character

The model comes from the checkpoint alone (its settings, vocabulary and parameters); the
sampler is `lstm_jax.generate`, the scoring `lstm_jax.evaluate` with `steps.eval_step`, as in
training. `restore` (`reader.restore_model`) is what the `sample` and `export` commands
load a checkpoint with.

Bad arguments raise `ValueError`s (`lstm_jax.errors.UserError`), which name them as Python
spells them (`length must be > 0, got 0.`): the checks are the commands' own, run under
`errors.python_arguments`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import evaluate, steps
from lstm_jax.config import ModelConfig, SampleConfig
from lstm_jax.data import Vocab
from lstm_jax.errors import UserError, python_arguments
from lstm_jax.generate import sample_text, stream_text
from lstm_jax.models import CharLSTM
from lstm_jax.reader import restore_model as restore  # What sample and export load with.
from lstm_jax.sample import SampleOptions, check_sampling_args
from lstm_jax.settings import check_choices

SCORE_CHUNK = 256  # Characters per evaluation step when scoring (one compile for any length).


class TrainedModel:
    """A checkpoint's model, ready to generate and score text.

    Attributes: `vocab` (a `Vocab`; `vocab.chars` are its characters, in id order), `config`
    (the `ModelConfig`), `step` (the checkpoint's training step), `val_bpc` (its validation
    bits per character, NaN if not recorded), `model` and `params` (the Flax module and its
    parameters, for `model.apply`).
    """

    def __init__(self, model: CharLSTM, params: Any, vocab: Vocab, step: int, meta: dict):
        self.model, self.params, self.vocab, self.step = model, params, vocab, step
        self.config: ModelConfig = model.config
        # The checkpoint's model: its parameters, or their average where that was better.
        self.val_bpc = float(meta.get("selected_val_loss", meta.get("val_loss", math.nan)))
        self.val_bpc /= math.log(2)
        self._eval_step = jax.jit(functools.partial(steps.eval_step, apply_fn=model.apply))

    def __repr__(self) -> str:
        config = self.config
        return (
            f"<lstm_jax model: {config.num_layers}x{config.hidden} {config.cell}, "
            f"vocabulary {self.vocab.size}, step {self.step}, val {self.val_bpc:.3f} bpc>"
        )

    def generate(
        self,
        prompt: str = "",
        length: int = 300,
        *,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: str = "",
        unknown: str = "error",
    ) -> str:
        """A continuation of `prompt` (not included) of `length` characters, as the `sample`
        command draws it with the same settings: temperature 0 is greedy; top_k 0 and top_p 1
        are off; the same seed gives the same text. With `stop`, the text ends at the first
        occurrence of `stop` in it, `stop` included. Prompt characters outside the vocabulary:
        a `UserError`, or dropped with unknown="skip"."""
        shape = SampleConfig(prompt=prompt, length=length, temperature=temperature)
        drawn = SampleOptions(
            seed=seed, top_k=top_k, top_p=top_p, stop=stop, unknown=unknown, sample=shape
        )
        options = dict(length=length, temperature=temperature, top_k=top_k, top_p=top_p)
        options |= dict(seed=seed, unknown=unknown, stop=stop)
        with python_arguments():  # As the sample command checks its flags, in Python's words.
            check_sampling_args(drawn, self.vocab.size)
            if stop:  # In chunks, so that generation ends soon after the stop string.
                pieces = stream_text(self.model, self.params, self.vocab, prompt, **options)
                return "".join(piece for (piece,) in pieces)
            (text,) = sample_text(self.model, self.params, self.vocab, prompt, **options)
        return text

    def score(self, text: str, *, unknown: str = "error") -> float:
        """Bits per character of `text`: the mean of -log2 p(character | all before it) over
        every character after the first, read as one stream from the zero state (the state
        carried through the whole text). Characters outside the vocabulary: a `UserError`
        naming them, or dropped with unknown="skip"."""
        with python_arguments():
            check_choices(evaluate.EvaluateOptions(unknown=unknown))  # As evaluate checks it.
        missing = self.vocab.unknown(text)
        if missing and unknown != "skip":
            shown = ", ".join(repr(c) for c in missing)
            raise UserError(
                f'The text has characters the model never saw: {shown}; pass unknown="skip" '
                "to score the text without them."
            )
        ids = self.vocab.encode("".join(c for c in text if c not in missing))
        if len(ids) < 2:
            raise UserError("score needs a text of 2 characters or more: the first is not scored.")
        num_chunks = math.ceil((len(ids) - 1) / SCORE_CHUNK)
        padded = np.zeros(num_chunks * SCORE_CHUNK + 1, np.int32)
        padded[: len(ids)] = ids
        weights = (np.arange(num_chunks * SCORE_CHUNK) < len(ids) - 1).astype(np.float32)

        def chunks(x: np.ndarray) -> np.ndarray:  # [chunks, 1 stream, SCORE_CHUNK]
            return x.reshape(num_chunks, 1, SCORE_CHUNK)

        streams = (chunks(padded[:-1]), chunks(padded[1:]), chunks(weights))
        zero = jax.tree.map(jnp.asarray, self.model.initialize_carry(1))
        loss = evaluate.evaluate(self._eval_step, self.params, streams, zero)
        return steps.bits_per_char(loss)


def load(
    workdir: str | os.PathLike, checkpoint: str = "best", member: str | int = ""
) -> TrainedModel:
    """The model of a training run's checkpoint ('best', 'latest' or a step number), from the
    checkpoint alone; see `TrainedModel`. In a population's workdir, `member` picks the member
    (an index, or settings such as "learning_rate=0.004,seed=1"); by default the best by
    validation. A `UserError` (a `ValueError`) says what is wrong, naming the arguments."""
    with python_arguments():
        return TrainedModel(*restore(workdir, checkpoint, member))
