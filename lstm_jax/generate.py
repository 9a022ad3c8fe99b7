"""Text generation as a library: the jitted sampler and its helpers.

`generate` feeds the prompt through the model, then draws `length` characters with
`jax.lax.scan` on the device (no Python loop per character), for a batch of samples at once.
Temperature 0 is greedy argmax; `top_k` keeps only the k most likely characters. The command
that samples from a checkpoint is `lstm_jax.sample`; the training loop samples through here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.data import Vocab
from lstm_jax.errors import UsageError, UserError
from lstm_jax.models import CharLSTM


def _next_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int) -> jax.Array:
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    greedy = jnp.argmax(logits, axis=-1)
    # Dividing by a tiny temperature instead of 0 keeps the sampled branch finite.
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "length", "top_k"))
def generate(
    model: CharLSTM,
    params,
    prompt_ids: jax.Array,
    key: jax.Array,
    temperature: float | jax.Array = 1.0,
    *,
    length: int,
    top_k: int = 0,
) -> jax.Array:
    """int32 prompt [batch, prompt_len >= 1] -> int32 continuation [batch, length]."""
    batch = prompt_ids.shape[0]
    carry = model.initialize_carry(batch)
    if prompt_ids.shape[1] > 1:
        carry, _ = model.apply({"params": params}, carry, prompt_ids[:, :-1])
    temperature = jnp.asarray(temperature, jnp.float32)

    def step(state, step_key):
        carry, token = state
        carry, logits = model.apply({"params": params}, carry, token[:, None])
        token = _next_token(logits[:, 0], step_key, temperature, top_k)
        return (carry, token), token

    _, tokens = jax.lax.scan(step, (carry, prompt_ids[:, -1]), jax.random.split(key, length))
    return tokens.T


def encode_prompt(vocab: Vocab, prompt: str, unknown: str = "error") -> np.ndarray:
    """The prompt's ids; characters outside the vocabulary are an error or dropped (`unknown`)."""
    missing = vocab.unknown(prompt)
    if missing and unknown == "error":
        shown = ", ".join(repr(c) for c in missing)
        raise UserError(
            f"The prompt has characters the model never saw: {shown}; change the prompt or "
            "pass --unknown=skip to drop them."
        )
    prompt = "".join(c for c in prompt if c not in missing)
    if not prompt:
        prompt = "\n" if "\n" in vocab.chars else vocab.chars[0]
    return vocab.encode(prompt)


def sample_text(
    model: CharLSTM,
    params,
    vocab: Vocab,
    prompt: str,
    *,
    length: int,
    temperature: float,
    top_k: int = 0,
    num_samples: int = 1,
    seed: int = 0,
    unknown: str = "error",
) -> list[str]:
    """Generate `num_samples` continuations of `prompt` and return them as text."""
    ids = encode_prompt(vocab, prompt, unknown)
    prompt_ids = jnp.asarray(np.tile(ids, (num_samples, 1)))
    tokens = generate(
        model, params, prompt_ids, jax.random.key(seed), temperature, length=length, top_k=top_k
    )
    return [vocab.decode(row) for row in np.asarray(tokens)]


def check_sampling_args(length: int, temperature: float, top_k: int, vocab_size: int) -> None:
    if length <= 0:
        raise UsageError(f"--length must be positive, got {length}.")
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 is greedy), got {temperature}.")
    if top_k and not 1 <= top_k <= vocab_size:
        raise UsageError(f"--top_k must be 0 (off) or in [1, {vocab_size}], got {top_k}.")
