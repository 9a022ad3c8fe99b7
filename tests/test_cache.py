"""The continuous cache (`lstm_jax.cache`, run by `lstm_jax.scoring`): causal, the model's scores
with lambda 0, and its formula written out in numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import make_model
from references import stream_loss

from lstm_jax import cache as cache_lib
from lstm_jax.cache import CacheConfig
from lstm_jax.data import Batcher
from lstm_jax.dynamic import DynamicEvaluator, gradient_rms
from lstm_jax.models import init_params
from lstm_jax.scoring import Adapt, Member, position_losses, score

VOCAB = 7


@pytest.fixture(scope="module")
def tiny():
    model = make_model(VOCAB, embed_dim=5, hidden=8, num_layers=2)
    params = init_params(model, jax.random.key(0))
    # A repetitive text, so the cache has something to copy.
    ids = np.asarray(np.tile(jax.random.randint(jax.random.key(1), (13,), 0, VOCAB), 6), np.int32)
    return model, params, ids


def _cache(window=5, theta=0.7, lam=0.3) -> CacheConfig:
    return CacheConfig(cache=True, cache_window=window, cache_theta=theta, cache_lambda=lam)


def _losses(model, params, ids, **kwargs) -> np.ndarray:
    """The loss of every predicted character, in text order (one stream)."""
    rms = jax.tree.map(jnp.ones_like, params)
    losses, weights = position_losses([Member(model, params, rms)], ids, **kwargs)
    return losses.transpose(1, 0, 2).reshape(-1)[: len(ids) - 1]


@pytest.mark.parametrize("adapt", [None, Adapt(lr=1e-2, decay=1e-2, segment=6)])
def test_a_prediction_depends_on_nothing_from_the_character_it_predicts_on(tiny, adapt):
    model, params, ids = tiny
    t = 40  # The position predicting ids[t + 1], in the sixth chunk of 8 (the window 5 is full).
    rng = np.random.default_rng(0)
    probabilities, before = [], None
    for candidate in range(VOCAB):
        for _ in range(2):  # Two different texts after the candidate.
            changed = ids.copy()
            changed[t + 1] = candidate
            changed[t + 2 :] = rng.integers(0, VOCAB, len(ids) - t - 2)
            losses = _losses(model, params, changed, cache=_cache(), adapt=adapt, chunk=8)
            before = losses[:t] if before is None else before
            np.testing.assert_array_equal(losses[:t], before)  # Earlier predictions unchanged.
            probabilities.append(np.exp(-losses[t]))
    p = np.asarray(probabilities).reshape(VOCAB, 2)
    np.testing.assert_array_equal(p[:, 0], p[:, 1])  # Nothing after the candidate counts.
    # A distribution over the candidates, which it would not be if the cache had seen each
    # candidate before scoring it.
    np.testing.assert_allclose(p[:, 0].sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("num_streams", [1, 3])
def test_with_lambda_zero_the_scores_are_the_models(tiny, num_streams):
    model, params, ids = tiny
    cache = _cache(lam=0.0)
    losses, weights = position_losses(
        [Member(model, params)], ids, num_streams=num_streams, cache=cache, chunk=8
    )
    no_cache, _ = position_losses([Member(model, params)], ids, num_streams=num_streams, chunk=8)
    np.testing.assert_array_equal(losses, no_cache)
    # Every position's loss is the model's own, from one apply over the chunk's streams.
    from lstm_jax.data import eval_streams

    inputs, targets, _ = eval_streams(ids, num_streams, 8)
    carry = model.initialize_carry(num_streams)
    for chunk in range(inputs.shape[0]):
        carry, logits = jax.jit(model.apply)({"params": params}, carry, inputs[chunk])
        import optax

        want = optax.softmax_cross_entropy_with_integer_labels(logits, targets[chunk])
        np.testing.assert_array_equal(losses[chunk], np.asarray(want) * weights[chunk])
    mean, count = score([Member(model, params)], ids, num_streams=num_streams, cache=cache, chunk=8)
    assert count == len(ids) - 1
    np.testing.assert_allclose(mean, stream_loss(model, params, ids, num_streams, 8), rtol=1e-6)


def test_with_lambda_zero_dynamic_evaluation_is_unchanged(tiny):
    model, params, ids = tiny
    train = np.asarray(jax.random.randint(jax.random.key(2), (500,), 0, VOCAB), np.int32)
    rms = gradient_rms(model, params, Batcher(train, 10, 4, 0), 2)
    want, _ = DynamicEvaluator(model, params, rms).score(ids, lr=1e-2, decay=1e-2, segment=9)
    adapt = Adapt(lr=1e-2, decay=1e-2, segment=9)
    got, _ = score([Member(model, params, rms)], ids, cache=_cache(lam=0.0), adapt=adapt)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    adapted, _ = score([Member(model, params, rms)], ids, cache=_cache(lam=0.2), adapt=adapt)
    assert adapted != pytest.approx(want, rel=1e-4)  # The cache acts on the adapted model.


def _numpy_cache(hidden, targets, window, theta, vocab) -> tuple[np.ndarray, np.ndarray]:
    """p_cache at every position of one stream, position by position, from the formula."""
    hidden = np.asarray(hidden, np.float64)
    probs, has = np.zeros((len(targets), vocab)), np.zeros(len(targets), bool)
    for t in range(len(targets)):
        earlier = range(max(0, t - window), t)
        if not earlier:
            continue
        scores = np.array([theta * hidden[t] @ hidden[i] for i in earlier])
        w = np.exp(scores - scores.max())
        w /= w.sum()
        for weight, i in zip(w, earlier, strict=True):
            probs[t, targets[i]] += weight
        has[t] = True
    return probs, has


def test_the_cache_is_its_formula_on_a_hand_made_example():
    hidden = np.array([[1, 0], [0, 1], [1, 1], [2, 0], [0, -1], [1, -1], [0.5, 2]], np.float32)
    targets = np.array([2, 0, 1, 2, 2, 0, 1], np.int32)
    window, theta = 3, 0.8
    want, want_has = _numpy_cache(hidden, targets, window, theta, vocab=3)
    # Position 3, by hand: earlier 0, 1, 2 with scores 1.6, 0, 1.6 -> targets 2, 0, 1.
    e = np.exp([1.6, 0.0, 1.6])
    np.testing.assert_allclose(want[3], [e[1], e[2], e[0]] / e.sum())
    # The module's, in two chunks (4 then 3), the cache carried between them.
    state = cache_lib.empty(window, 2)
    got, got_has = [], []
    for part in (slice(0, 4), slice(4, 7)):
        h, y = jnp.asarray(hidden[part]), jnp.asarray(targets[part])
        w = jnp.ones(len(targets[part]))
        log_p, has = cache_lib.cache_log_probs(state, h, y, w, theta, 3)
        got.append(np.exp(np.asarray(log_p)))
        got_has.append(np.asarray(has))
        state = cache_lib.advance(state, h, y, w)
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.concatenate(got_has), want_has)
    # The mixture: (1 - lambda) p_model + lambda p_cache; the model alone at the first position.
    p_model = np.full((7, 3), 1 / 3)
    mixed = cache_lib.mix_distribution(
        jnp.log(jnp.asarray(p_model, jnp.float32)), jnp.log(jnp.asarray(want, jnp.float32)),
        jnp.asarray(want_has), 0.25,
    )  # fmt: skip
    want_mixed = np.where(want_has[:, None], 0.75 * p_model + 0.25 * want, p_model)
    np.testing.assert_allclose(np.exp(np.asarray(mixed)), want_mixed, rtol=1e-6)


def test_the_pass_pairs_each_hidden_state_with_the_next_character(tiny):
    """The whole pass (chunks of 8, a window of 5) against the formula on the model's own
    hidden states and probabilities, computed in one apply over the text."""
    model, params, ids = tiny
    window, theta, lam = 5, 0.7, 0.3
    _, logits, hidden = model.apply(
        {"params": params}, model.initialize_carry(1), jnp.asarray(ids[None, :-1]),
        return_hidden=True,
    )  # fmt: skip
    targets = ids[1:]
    z = np.asarray(logits[0], np.float64)
    p_model = np.exp(z - z.max(-1, keepdims=True))
    p_model /= p_model.sum(-1, keepdims=True)
    p_cache, has = _numpy_cache(hidden[0], targets, window, theta, VOCAB)
    p = np.where(has[:, None], (1 - lam) * p_model + lam * p_cache, p_model)
    want = -np.log(p[np.arange(len(targets)), targets])
    got = _losses(model, params, ids, cache=_cache(window, theta, lam), chunk=8)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert np.mean(got) < np.mean(-np.log(p_model[np.arange(len(targets)), targets]))


# --- `python -m lstm_jax.evaluate --cache / --ensemble`, through the real command line ----------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_text):
    """A population of two seeds and a single run of another width, on the same text and split;
    a run on another text (another vocabulary), and one with another test part."""
    from lstm_jax.config import Config
    from lstm_jax.train import train_and_evaluate

    folder = tmp_path_factory.mktemp("ensemble")
    (folder / "text.txt").write_text(small_text)
    (folder / "other.txt").write_text(small_text.upper())
    common = dict(
        embed_dim=8, num_layers=1, seq_len=16, global_batch=8, num_steps=12, warmup_steps=2,
        log_every=6, eval_every=6, checkpoint_every=6, learning_rate=0.02, dropout=0.0,
        ema_decay=0.0,
    )  # fmt: skip
    made = {}
    for name, text, extra in (
        ("pop", "text.txt", dict(hidden=16, seeds=2)),
        ("single", "text.txt", dict(hidden=24, seed=5)),
        ("other", "other.txt", dict(hidden=16)),
        ("cut", "text.txt", dict(hidden=16, test_fraction=0.2)),
    ):
        config = Config.create(
            data_path=str(folder / text), workdir=str(folder / name), **common, **extra
        )
        train_and_evaluate(config, devices=jax.local_devices()[:1])
        made[name] = folder / name
    return made


def _evaluate(*args) -> tuple[str, float]:
    from subprocesses import run_module

    result = run_module("lstm_jax.evaluate", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    name, bpc = result.stdout.strip().splitlines()[-1].split(": ", 1)
    return name, float(bpc.split(" bpc")[0])


def _position_log_probs(workdir, member="") -> tuple[np.ndarray, np.ndarray]:
    """log p of every test character after the first, the text read in one `model.apply`
    (not chunked, unlike the command), and the test ids."""
    from lstm_jax.data import Vocab, load_split
    from lstm_jax.evaluate import run_data_config
    from lstm_jax.reader import restore_model

    model, params, vocab, _, meta = restore_model(workdir, "best", member)
    ids = load_split(run_data_config(meta), lambda _: Vocab(vocab.chars))[1].test
    _, logits = model.apply({"params": params}, model.initialize_carry(1), ids[None, :-1])
    log_probs = jax.nn.log_softmax(np.asarray(logits[0], np.float64))
    return np.take_along_axis(log_probs, ids[1:, None], axis=-1)[:, 0], ids


def test_evaluate_ensemble_is_the_mean_of_the_members_probabilities(runs):
    pop, single = runs["pop"], runs["single"]
    members = [_position_log_probs(pop, m)[0] for m in (0, 1)] + [_position_log_probs(single)[0]]
    # The closed form, in float64: -mean_t log((p_0(x_t) + p_1(x_t) + p_2(x_t)) / 3), in bits.
    want = -np.mean(np.log(np.mean(np.exp(np.stack(members)), axis=0))) / np.log(2)
    name, bpc = _evaluate(f"--ensemble={pop},{single}")
    assert name == "test (ensemble of 3)"
    assert abs(bpc - want) < 1e-4, (bpc, want)
    # Not the mean of the log probabilities (nor the mean of their losses).
    geometric = -np.mean(np.stack(members)) / np.log(2)
    assert want < geometric - 1e-3 and abs(bpc - geometric) > 5e-4
    # An ensemble of one model twice is that model.
    _, alone = _evaluate(f"--workdir={single}")
    _, twice = _evaluate(f"--ensemble={single},{single}")
    assert abs(twice - alone) < 1e-4 and abs(alone - (-np.mean(members[2]) / np.log(2))) < 1e-4


def test_evaluate_cache_with_weight_0_is_plain_evaluation_and_otherwise_is_not(runs):
    single = runs["single"]
    _, plain = _evaluate(f"--workdir={single}")
    name, off = _evaluate(f"--workdir={single}", "--cache", "--cache_lambda=0")
    assert name == "test (cache)" and abs(off - plain) < 1e-4
    _, on = _evaluate(f"--workdir={single}", "--cache", "--cache_lambda=0.3", "--cache_theta=1")
    assert abs(on - plain) > 1e-3
    # With dynamic evaluation that learns nothing, still the plain score.
    name, still = _evaluate(
        f"--workdir={single}", "--cache", "--cache_lambda=0", "--dynamic", "--dynamic_lr=0",
        "--dynamic_decay=0", "--dynamic_stat_batches=2",
    )  # fmt: skip
    assert name == "test (cache) (dynamic evaluation)" and abs(still - plain) < 1e-4


BAD_COMBINATIONS = [
    # (args, the one error line's phrase, exit status)
    (["--cache_theta=1"], "--cache_theta is a setting of --cache; pass --cache too", 2),
    (["--dynamic_lr=1e-4"], "--dynamic_lr is a setting of --dynamic; pass --dynamic too", 2),
    (["--ensemble={pop}", "--member=1"], "--ensemble names the models", 2),
    (["--ensemble={pop}", "--workdir={pop}"], "drop --workdir", 2),
    (["--ensemble=,"], "--ensemble names no run folder", 2),
    (["--ensemble={pop},{other}"], "reads another vocabulary", 1),
    (["--ensemble={pop},{cut}"], "cut another test text than", 1),
    (["--ensemble={pop},{pop}/nowhere"], "nowhere", 1),
    (["--cache", "--cache_window=0"], "--cache_window must be in", 2),
    (["--cache", "--cache_lambda=1.5"], "--cache_lambda must be", 2),
]


@pytest.mark.parametrize(
    "args, phrase, status", BAD_COMBINATIONS, ids=[" ".join(b[0]) for b in BAD_COMBINATIONS]
)
def test_evaluate_refuses_bad_cache_and_ensemble_flags_in_one_line(runs, args, phrase, status):
    from subprocesses import run_module

    args = [a.format(**{k: str(v) for k, v in runs.items()}) for a in args]
    if not any(a.startswith(("--ensemble", "--workdir")) for a in args):
        args.append(f"--workdir={runs['single']}")
    result = run_module("lstm_jax.evaluate", *args)
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "FATAL"))]
    assert len(lines) == 1 and phrase in lines[0], result.stderr[-2000:]


def test_an_ensemble_is_the_log_of_the_mean_of_made_up_distributions():
    from lstm_jax.ensemble import combine

    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])  # 3 members, 3 chars.
    mixed = np.exp(np.asarray(combine(jnp.log(jnp.asarray(p)))))
    np.testing.assert_allclose(mixed, [0.8 / 3, 1.25 / 3, 0.95 / 3], rtol=1e-6)
    one = np.log(np.array([[0.3, 0.7]], np.float32))
    np.testing.assert_array_equal(np.asarray(combine(jnp.asarray(one))), one[0])  # To the bit.
