"""Text generation as a library: the jitted sampler and its helpers.

`generate` feeds the prompt through the model, then draws `length` characters with
`jax.lax.scan` on the device (no Python loop per character), for a batch of samples at once.
Temperature 0 is greedy argmax; `top_k` keeps only the k most likely characters, `top_p` the
smallest set of most likely characters whose probability reaches p (nucleus sampling, on the
tempered distribution, after top_k). `stream_text` draws the same characters in chunks, one
jitted call per chunk, so text can be shown as it comes. The command that samples from a
checkpoint is `lstm_jax.sample`; the training loop samples through here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.data import Vocab
from lstm_jax.errors import UserError, argument
from lstm_jax.models import CharLSTM

# Characters per row per jitted call when streaming. A call costs about 1.2 ms beyond its
# characters (a 2 x 512 LSTM at batch 1 on a CPU; 7 characters' worth), so 1024 keeps streaming
# within a few % of one call (docs/performance.md), and the first text comes within 0.25 s even
# at 4,000 chars/s; wider batches take fewer per row (256 at batch 64).
STREAM_CHUNK, STREAM_CHUNK_MIN, STREAM_CHARS = 1024, 64, 16384


def stream_chunk(batch: int) -> int:
    """The default characters per row per call for `batch` rows."""
    return max(STREAM_CHUNK_MIN, min(STREAM_CHUNK, STREAM_CHARS // batch))


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """`logits` with every character outside the nucleus of softmax(logits) set to -inf."""
    order = jnp.argsort(-logits, axis=-1)
    probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Probability of the more likely characters.
    keep_sorted = before < top_p  # The most likely always; the rest until p is reached.
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def _next_token(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int, top_p: float = 1.0
) -> jax.Array:
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    greedy = jnp.argmax(logits, axis=-1)
    # Dividing by a tiny temperature instead of 0 keeps the sampled branch finite.
    tempered = logits / jnp.maximum(temperature, 1e-6)
    if top_p < 1:
        tempered = _nucleus(tempered, top_p)
    sampled = jax.random.categorical(key, tempered, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _prime(model: CharLSTM, params, prompt_ids: jax.Array):
    """(carry after all but the prompt's last character, that last character)."""
    carry = model.initialize_carry(prompt_ids.shape[0])
    if prompt_ids.shape[1] > 1:
        carry, _ = model.apply({"params": params}, carry, prompt_ids[:, :-1])
    return carry, prompt_ids[:, -1]


def _draw(model: CharLSTM, params, carry, token, keys, temperature, top_k: int, top_p: float):
    """One character per key, each fed back in: ((carry, last token), tokens [batch, keys])."""
    temperature = jnp.asarray(temperature, jnp.float32)

    def step(state, step_key):
        carry, token = state
        carry, logits = model.apply({"params": params}, carry, token[:, None])
        token = _next_token(logits[:, 0], step_key, temperature, top_k, top_p)
        return (carry, token), token

    state, tokens = jax.lax.scan(step, (carry, token), keys)
    return state, tokens.T


@functools.partial(jax.jit, static_argnames=("model", "length", "top_k", "top_p"))
def generate(
    model: CharLSTM,
    params,
    prompt_ids: jax.Array,
    key: jax.Array,
    temperature: float | jax.Array = 1.0,
    *,
    length: int,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """int32 prompt [batch, prompt_len >= 1] -> int32 continuation [batch, length]."""
    carry, token = _prime(model, params, prompt_ids)
    keys = jax.random.split(key, length)
    return _draw(model, params, carry, token, keys, temperature, top_k, top_p)[1]


_prime_jit = jax.jit(_prime, static_argnames=("model",))


@functools.partial(jax.jit, static_argnames=("model", "top_k", "top_p"))
def _draw_chunk(model, params, carry, token, keys, index, temperature, top_k: int, top_p: float):
    """`_draw` with the keys of chunk `index` of `keys` [chunks, size] (no slicing op apart)."""
    return _draw(model, params, carry, token, keys[index], temperature, top_k, top_p)


def stream_tokens(
    model: CharLSTM,
    params,
    prompt_ids: jax.Array,
    key: jax.Array,
    temperature: float = 1.0,
    *,
    length: int,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk: int | None = None,
) -> Iterator[np.ndarray]:
    """`generate`'s tokens (the same keys, so the same draws) as [batch, <= chunk] pieces.

    The chunks are of equal size (at most `chunk`, default `stream_chunk(batch)`; one compile),
    the last one cut; the device computes the next chunk while the caller handles this one.
    """
    chunk = chunk or stream_chunk(prompt_ids.shape[0])
    count = math.ceil(length / chunk)
    size = math.ceil(length / count)
    keys = jax.random.split(key, length)
    if count * size > length:  # Padding draws, computed and dropped, keep every chunk one shape.
        keys = jnp.concatenate([keys, keys[: count * size - length]])
    keys = keys.reshape(count, size)
    carry, token = _prime_jit(model, params, prompt_ids)
    pending = None
    for i in range(count):
        (carry, token), tokens = _draw_chunk(
            model, params, carry, token, keys, i, temperature, top_k, top_p
        )
        if pending is not None:
            yield np.asarray(pending)
        pending = tokens
    yield np.asarray(pending)[:, : length - (count - 1) * size]


def encode_prompt(vocab: Vocab, prompt: str, unknown: str = "error") -> np.ndarray:
    """The prompt's ids; characters outside the vocabulary are an error or dropped (`unknown`)."""
    missing = vocab.unknown(prompt)
    if missing and unknown == "error":
        shown = ", ".join(repr(c) for c in missing)
        raise UserError(
            f"The prompt has characters the model never saw: {shown}; change the prompt or "
            f"pass {argument('unknown', 'skip')} to drop them."
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
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    unknown: str = "error",
    stop: str = "",
) -> list[str]:
    """Generate `num_samples` continuations of `prompt` and return them as text; with `stop`,
    each ends at the first occurrence of `stop` in it (`stop` included)."""
    ids = encode_prompt(vocab, prompt, unknown)
    prompt_ids = jnp.asarray(np.tile(ids, (num_samples, 1)))
    tokens = generate(
        model,
        params,
        prompt_ids,
        jax.random.key(seed),
        temperature,
        length=length,
        top_k=top_k,
        top_p=top_p,
    )
    return [cut_at_stop(vocab.decode(row), stop) for row in np.asarray(tokens)]


def cut_at_stop(text: str, stop: str) -> str:
    """`text` up to and including the first occurrence of `stop`; all of it if none (or no stop)."""
    end = text.find(stop) if stop else -1
    return text if end < 0 else text[: end + len(stop)]


def stream_text(
    model: CharLSTM,
    params,
    vocab: Vocab,
    prompt: str,
    *,
    length: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    unknown: str = "error",
    stop: str = "",
    chunk: int | None = None,
) -> Iterator[list[str]]:
    """`sample_text`'s texts as they are generated: one list per chunk with each sample's new
    text (empty once a sample has reached `stop`). Joined, they are `sample_text`'s texts; the
    generation ends early when every sample has reached `stop`."""
    ids = encode_prompt(vocab, prompt, unknown)
    prompt_ids = jnp.asarray(np.tile(ids, (num_samples, 1)))
    key = jax.random.key(seed)
    texts, done = [""] * num_samples, [False] * num_samples
    options = dict(length=length, top_k=top_k, top_p=top_p, chunk=chunk)
    for tokens in stream_tokens(model, params, prompt_ids, key, temperature, **options):
        pieces = []
        for i, row in enumerate(tokens):
            if done[i]:
                pieces.append("")
                continue
            before, text = len(texts[i]), texts[i] + vocab.decode(row)
            # A new match ends in the new text, so starts at most len(stop) - 1 before it.
            end = text.find(stop, max(before - len(stop) + 1, 0)) if stop else -1
            if end >= 0:
                text, done[i] = text[: end + len(stop)], True
            texts[i] = text
            pieces.append(text[before:])
        yield pieces
        if all(done):
            return


def sample_for_log(
    model: CharLSTM, params: Any, vocab: Vocab, text_ids: np.ndarray, options: Any, seed: int
) -> str:
    """`prompt|continuation` for a training log: from `options.prompt` (a `SampleConfig`), or
    else a window of 100 characters of `text_ids` at a position drawn from `seed`."""
    prompt = options.prompt
    if not prompt:
        start = np.random.default_rng(seed).integers(0, max(len(text_ids) - 100, 1))
        prompt = vocab.decode(text_ids[start : start + 100])
    (text,) = sample_text(
        model,
        params,
        vocab,
        prompt,
        length=options.length,
        temperature=options.temperature,
        seed=seed,
        unknown="skip",
    )
    return f"{prompt}|{text}"
