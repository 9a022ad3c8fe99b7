"""Dynamic evaluation against static evaluation and against its update rule written out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from builders import make_model
from references import stream_loss

from lstm_jax.data import Batcher
from lstm_jax.dynamic import DynamicEvaluator, decay_rates, gradient_rms, update
from lstm_jax.models import init_params

VOCAB = 11


@pytest.fixture(scope="module")
def trained():
    model = make_model(VOCAB, embed_dim=5, hidden=12, num_layers=2)
    params = init_params(model, jax.random.key(0))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (301,), 0, VOCAB), np.int32)
    train_ids = np.asarray(jax.random.randint(jax.random.key(2), (2000,), 0, VOCAB), np.int32)
    rms = gradient_rms(model, params, Batcher(train_ids, 20, 4, 0), 3)
    return model, params, ids, train_ids, rms


@pytest.mark.parametrize("num_streams", [1, 4])
def test_no_learning_rate_and_no_decay_is_static_evaluation(trained, num_streams):
    model, params, ids, _, rms = trained
    evaluator = DynamicEvaluator(model, params, rms)
    loss, count = evaluator.score(ids, lr=0.0, decay=0.0, segment=25, num_streams=num_streams)
    assert count == len(ids) - 1
    want = stream_loss(model, params, ids, num_streams=num_streams, seq_len=25)
    np.testing.assert_allclose(loss, want, rtol=2e-6)


def test_each_segment_is_scored_before_the_weights_learn_from_it(trained):
    model, params, ids, _, rms = trained
    evaluator = DynamicEvaluator(model, params, rms)
    lr, decay, epsilon, segment = 3e-2, 1e-2, 2e-5, 30
    # One segment: whatever the learning rate, its loss is the static model's.
    first, _ = evaluator.score(ids[: segment + 1], lr=lr, decay=decay, segment=segment)
    want_first = stream_loss(model, params, ids[: segment + 1], num_streams=1, seq_len=segment)
    np.testing.assert_allclose(first, want_first, rtol=2e-6)
    # Two segments: the second is scored by the weights after one update, written out here.
    two, _ = evaluator.score(ids[: 2 * segment + 1], lr=lr, decay=decay, segment=segment)

    def segment_loss(p, carry, begin):
        new_carry, logits = model.apply(
            {"params": p}, carry, jnp.asarray(ids[begin : begin + segment][None])
        )
        targets = jnp.asarray(ids[begin + 1 : begin + segment + 1])
        return optax.softmax_cross_entropy_with_integer_labels(logits[0], targets).mean(), new_carry

    (_, carry), grads = jax.value_and_grad(segment_loss, has_aux=True)(
        params, model.initialize_carry(1), 0
    )
    # After the first segment the weights are still the trained ones: the decay adds nothing.
    adapted = jax.tree.map(
        lambda p, g, r: np.asarray(p) - lr * np.asarray(g) / (np.asarray(r) + epsilon),
        params, grads, rms,
    )  # fmt: skip
    second, _ = segment_loss(adapted, carry, segment)
    np.testing.assert_allclose(two, (want_first + float(second)) / 2, rtol=1e-5)
    assert abs(float(second) - want_first) > 1e-4  # The update changed something.


def test_the_decay_moves_the_weights_back_towards_the_trained_ones():
    p0 = {"w": np.ones((3, 2), np.float32)}
    p = {"w": np.full((3, 2), 3.0, np.float32)}
    rms = {"w": np.array([[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]], np.float32)}
    decay = 0.5
    rates = decay_rates(rms, decay)
    # rate = rms / mean rms (34.33), capped at 1 / decay = 2.
    np.testing.assert_allclose(rates["w"][:, 0], [1 / 34.333332, 2 / 34.333332, 2.0], rtol=1e-5)
    zero = {"w": np.zeros((3, 2), np.float32)}
    moved = update(p, zero, p0, rms, rates, 0.0, decay, 2e-5)["w"]
    # Each weight moves the fraction decay * rate of its way back, all of it where capped.
    np.testing.assert_allclose(moved[:, 0], 3.0 - 2.0 * decay * rates["w"][:, 0], rtol=1e-6)
    np.testing.assert_allclose(moved[2], [1.0, 1.0], rtol=1e-6)
    assert np.all(np.abs(moved - 1.0) <= np.abs(p["w"] - 1.0))


def test_gradient_rms_is_the_root_mean_square_over_training_batches(trained):
    model, params, _, train_ids, rms = trained
    batcher = Batcher(train_ids, 20, 4, 0)

    def loss(p, carry, batch):
        new_carry, logits = model.apply({"params": p}, carry, jnp.asarray(batch[:, :-1]))
        targets = jnp.asarray(batch[:, 1:])
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), new_carry

    carry, squares = model.initialize_carry(4), []
    for step in range(3):  # The state carried from batch to batch, as training reads them.
        (_, carry), grads = jax.value_and_grad(loss, has_aux=True)(
            params, carry, batcher.batch(step)
        )
        squares.append(jax.tree.map(lambda g: np.asarray(g, np.float64) ** 2, grads))
    want = jax.tree.map(lambda *s: np.sqrt(np.mean(s, axis=0)), *squares)
    for got, expected in zip(jax.tree.leaves(rms), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)


def test_dynamic_evaluation_learns_a_repeated_text():
    # A text that repeats itself: adapting to its first half must help on the second.
    model = make_model(VOCAB, embed_dim=5, hidden=16, num_layers=1)
    params = init_params(model, jax.random.key(0))
    piece = np.asarray(jax.random.randint(jax.random.key(5), (40,), 0, VOCAB), np.int32)
    ids = np.tile(piece, 12)
    rms = gradient_rms(model, params, Batcher(np.tile(piece, 30), 20, 4, 0), 2)
    evaluator = DynamicEvaluator(model, params, rms)
    static, _ = evaluator.score(ids, lr=0.0, decay=0.0, segment=20)
    adapted, _ = evaluator.score(ids, lr=3e-3, decay=0.0, segment=20)
    assert adapted < static - 0.08, (adapted, static)  # Measured: 2.300 against 2.417.
