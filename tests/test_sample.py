"""Sampling: reproducible, greedy in the limits, rows drawn from the tempered model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import make_model

from lstm_jax.config import SampleConfig
from lstm_jax.data import Vocab
from lstm_jax.errors import UsageError, UserError
from lstm_jax.generate import (
    _next_token,
    encode_prompt,
    generate,
    sample_text,
    stream_text,
    stream_tokens,
)
from lstm_jax.models import init_params
from lstm_jax.sample import SampleOptions, check_sampling_args

VOCAB = Vocab(" .abcdefghij")


@pytest.fixture(scope="module")
def model_and_params():
    model = make_model(VOCAB.size, embed_dim=8, hidden=16, num_layers=2)
    params = init_params(model, jax.random.key(0))
    # Larger weights make the distribution peaked but not one-hot: greedy and sampled differ.
    params = jax.tree.map(lambda p: p * 3.0, params)
    return model, params


def _greedy_by_hand(model, params, prompt_ids, length):
    carry = model.initialize_carry(prompt_ids.shape[0])
    carry, logits = model.apply({"params": params}, carry, prompt_ids)
    out = []
    token = jnp.argmax(logits[:, -1], -1)
    for _ in range(length):
        out.append(token)
        carry, logits = model.apply({"params": params}, carry, token[:, None])
        token = jnp.argmax(logits[:, -1], -1)
    return np.stack(out, 1)


def test_same_seed_gives_the_same_text(model_and_params):
    model, params = model_and_params
    a = sample_text(model, params, VOCAB, "abc", length=40, temperature=1.0, seed=3)
    b = sample_text(model, params, VOCAB, "abc", length=40, temperature=1.0, seed=3)
    c = sample_text(model, params, VOCAB, "abc", length=40, temperature=1.0, seed=4)
    assert a == b and a != c


def test_zero_temperature_tiny_temperature_and_top_1_all_equal_greedy_argmax(model_and_params):
    model, params = model_and_params
    prompt = jnp.asarray(np.tile(VOCAB.encode("a.b c"), (3, 1)))
    expected = _greedy_by_hand(model, params, prompt, 25)
    key = jax.random.key(0)
    for temperature, top_k in [(0.0, 0), (1e-4, 0), (1.0, 1)]:
        got = generate(model, params, prompt, key, temperature, length=25, top_k=top_k)
        np.testing.assert_array_equal(got, expected)
    sampled = generate(model, params, prompt, key, 1.0, length=25)
    assert not np.array_equal(sampled, expected)


def test_next_token_on_fake_logits():
    logits = jnp.log(jnp.asarray([[0.1, 0.6, 0.3]] * 2000))
    key = jax.random.key(0)
    assert set(np.asarray(_next_token(logits, key, jnp.float32(0.0), 0))) == {1}
    top2 = np.asarray(_next_token(logits, key, jnp.float32(1.0), 2))
    assert set(top2) == {1, 2}  # Never the least likely character.
    frequencies = np.bincount(np.asarray(_next_token(logits, key, jnp.float32(1.0), 0)), None, 3)
    np.testing.assert_allclose(frequencies / 2000, [0.1, 0.6, 0.3], atol=0.04)


def test_sample_text_rows_are_greedy_at_zero_and_tempered_model_draws_above(model_and_params):
    model, params = model_and_params
    # Temperature 0: every row is the argmax continuation computed by hand from the prompt.
    greedy = sample_text(model, params, VOCAB, "a.b c", length=30, temperature=0.0, num_samples=3)
    prompt = jnp.asarray(VOCAB.encode("a.b c")[None])
    assert greedy == [VOCAB.decode(_greedy_by_hand(model, params, prompt, 30)[0])] * 3
    # Temperature 0.5: the first character of each of many rows is an independent draw from
    # softmax(logits / 0.5) after the whole prompt, as computed by hand with model.apply. Ignoring
    # the temperature, multiplying by it or dropping the prompt's last character moves some
    # frequency by 0.067 or more; the sampling error here is about 0.003.
    n, temperature = 20_000, 0.5
    _, logits = model.apply({"params": params}, model.initialize_carry(1), prompt)
    expected = np.asarray(jax.nn.softmax(logits[0, -1] / temperature))
    texts = sample_text(
        model, params, VOCAB, "a.b c", length=3, temperature=temperature, num_samples=n, seed=1
    )
    first = VOCAB.encode("".join(t[0] for t in texts))
    np.testing.assert_allclose(np.bincount(first, None, VOCAB.size) / n, expected, atol=0.02)
    assert len(set(texts)) > 20  # Rows are drawn apart, not one draw copied to every row.


def test_prompt_with_unknown_characters_is_an_error_or_skipped():
    with pytest.raises(UserError, match=r"'X', 'é'.*--unknown=skip"):
        encode_prompt(VOCAB, "aXbéX", "error")
    np.testing.assert_array_equal(encode_prompt(VOCAB, "aXbé", "skip"), VOCAB.encode("ab"))


def _options(length=5, temperature=1.0, top_k=0, top_p=1.0, seed=0) -> SampleOptions:
    shape = SampleConfig(length=length, temperature=temperature)
    return SampleOptions(seed=seed, top_k=top_k, top_p=top_p, sample=shape)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(length=0), r"--length must be > 0, got 0\."),
        (dict(temperature=-1.0), r"--temperature must be >= 0"),
        (dict(temperature=float("nan")), r"--temperature must be a finite number >= 0, got nan"),
        (dict(top_k=13), r"--top_k must be 0 \(off\) or in \[1, 12\]"),
        (dict(top_k=-1), r"--top_k must be >= 0"),
        (dict(seed=-1), r"--seed must be in \[0, 4294967295\]"),
        (dict(seed=2**32), r"--seed must be in \[0, 4294967295\]"),
    ],
)
def test_impossible_sampling_arguments_are_refused(changes, message):
    with pytest.raises(UsageError, match=message):
        check_sampling_args(_options(**changes), VOCAB.size)
    check_sampling_args(_options(top_k=12, seed=2**32 - 1, temperature=0.0), VOCAB.size)


def test_top_p_1_is_no_top_p_and_below_1_changes_the_draws(model_and_params):
    model, params = model_and_params
    prompt = jnp.asarray(np.tile(VOCAB.encode("a.b c"), (8, 1)))
    key = jax.random.key(2)
    for temperature, top_k in [(0.5, 0), (1.0, 0), (1.0, 3)]:
        plain = generate(model, params, prompt, key, temperature, length=40, top_k=top_k)
        same = generate(model, params, prompt, key, temperature, length=40, top_k=top_k, top_p=1.0)
        np.testing.assert_array_equal(same, plain)
        nucleus = generate(
            model, params, prompt, key, temperature, length=40, top_k=top_k, top_p=0.5
        )
        assert not np.array_equal(nucleus, plain)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.01, float("nan")])
def test_top_p_outside_0_1_is_refused(top_p):
    with pytest.raises(UsageError, match=r"--top_p must be (a finite number )?in \(0, 1\]"):
        check_sampling_args(_options(top_p=top_p), VOCAB.size)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.8, 4, 0.7)])
def test_streamed_chunks_join_into_the_unstreamed_tokens_and_text(
    model_and_params, temperature, top_k, top_p
):
    model, params = model_and_params
    prompt = jnp.asarray(np.tile(VOCAB.encode("a.b c"), (3, 1)))
    key = jax.random.key(5)
    whole = generate(model, params, prompt, key, temperature, length=50, top_k=top_k, top_p=top_p)
    options = dict(length=50, temperature=temperature, top_k=top_k, top_p=top_p)
    texts = sample_text(model, params, VOCAB, "a.b c", num_samples=3, seed=5, **options)
    for chunk in (1, 7, 16, 50, 256):  # Uneven, even, whole and more than the length.
        pieces = list(stream_tokens(model, params, prompt, key, chunk=chunk, **options))
        assert max(p.shape[1] for p in pieces) <= chunk
        np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole)
        streamed = stream_text(model, params, VOCAB, "a.b c", num_samples=3, seed=5, chunk=chunk,
                               **options)  # fmt: skip
        assert ["".join(row) for row in zip(*streamed, strict=True)] == texts


def test_stop_ends_each_sample_at_its_first_occurrence(model_and_params):
    model, params = model_and_params
    options = dict(length=80, temperature=1.0, num_samples=4, seed=3)
    texts = sample_text(model, params, VOCAB, "a.b c", **options)
    # Two characters that occur twice or more in the first sample, first after its 10th.
    stop = next(
        texts[0][i : i + 2] for i in range(10, 78)
        if texts[0].count(texts[0][i : i + 2]) > 1 and texts[0][i : i + 2] not in texts[0][: i + 1]
    )  # fmt: skip
    want = [t[: t.index(stop) + len(stop)] if stop in t else t for t in texts]
    assert len(want[0]) < 80
    assert sample_text(model, params, VOCAB, "a.b c", stop=stop, **options) == want
    for chunk in (1, 3, 64, 256):  # A stop split over two chunks; both in one chunk.
        pieces = list(stream_text(model, params, VOCAB, "a.b c", stop=stop, chunk=chunk, **options))
        assert ["".join(row) for row in zip(*pieces, strict=True)] == want
    # Generation ends with the chunk that holds the stop: no chunk is drawn after it.
    one = options | {"num_samples": 1}
    pieces = list(stream_text(model, params, VOCAB, "a.b c", stop=stop, chunk=4, **one))
    assert "".join(p[0] for p in pieces) == want[0]
    assert len(pieces) == -(-len(want[0]) // 4)
