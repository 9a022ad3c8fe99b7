"""The model: shapes, parameter names and dropout (scan == step-by-step: tests/test_cells.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.models import CharLSTM, count_params, init_params


def _model():
    return CharLSTM(vocab_size=11, embed_dim=5, hidden=7, num_layers=2)


def test_shapes_of_logits_and_carry():
    model = _model()
    params = init_params(model, jax.random.key(0))
    tokens = jnp.zeros((3, 9), jnp.int32)
    carry, logits = model.apply({"params": params}, model.initialize_carry(3), tokens)
    assert logits.shape == (3, 9, 11) and logits.dtype == jnp.float32
    assert len(carry) == 2
    assert all(c.shape == (3, 7) and h.shape == (3, 7) for c, h in carry)
    # embed 11*5; per layer 4 gates x (input kernel, recurrent kernel, bias); logits 7*11+11.
    expected = 11 * 5 + 4 * (5 * 7 + 7 * 7 + 7) + 4 * (7 * 7 + 7 * 7 + 7) + 7 * 11 + 11
    assert count_params(params) == expected


def test_parameters_use_optimized_lstm_cell_names():
    params = init_params(_model(), jax.random.key(0))
    assert set(params) == {"embed", "lstm_0", "lstm_1", "logits"}
    # nn.OptimizedLSTMCell keeps LSTMCell's names, so checkpoints move between the two.
    assert set(params["lstm_0"]) == {"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"}


def test_dropout_changes_outputs_only_when_training():
    model = CharLSTM(vocab_size=11, embed_dim=5, hidden=7, num_layers=2, dropout=0.5)
    params = init_params(model, jax.random.key(0))
    tokens = jnp.ones((2, 6), jnp.int32)
    carry = model.initialize_carry(2)
    _, eval_a = model.apply({"params": params}, carry, tokens)
    _, eval_b = model.apply({"params": params}, carry, tokens)
    _, train = model.apply(
        {"params": params}, carry, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(eval_a, train)
