"""The model: shapes, parameter names and dropout (scan == step-by-step: tests/test_cells.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import make_model

from lstm_jax.config import Config
from lstm_jax.errors import UsageError
from lstm_jax.models import count_params, init_params


def _model():
    return make_model(11, embed_dim=5, hidden=7, num_layers=2)


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
    model = make_model(11, embed_dim=5, hidden=7, num_layers=2, dropout=0.5)
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


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bfloat16_compute_keeps_float32_parameters_and_close_loss(cell):
    sizes = dict(vocab_size=11, embed_dim=16, hidden=32, num_layers=2, cell=cell)
    model32, model16 = make_model(**sizes), make_model(**sizes, dtype="bfloat16")
    params = init_params(model16, jax.random.key(0))
    # Same parameter tree, all float32: checkpoints move freely between dtypes.
    assert jax.tree.structure(params) == jax.tree.structure(init_params(model32, jax.random.key(0)))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    tokens = jax.random.randint(jax.random.key(1), (4, 20), 0, 11)

    def loss(model, params):
        carry, logits = model.apply({"params": params}, model.initialize_carry(4), tokens)
        targets = jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), 11)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * targets, -1)), carry

    (loss32, carry32), grads32 = jax.value_and_grad(loss, 1, has_aux=True)(model32, params)
    (loss16, carry16), grads16 = jax.value_and_grad(loss, 1, has_aux=True)(model16, params)
    assert loss16.dtype == jnp.float32 and jax.tree.leaves(carry16)[0].dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=1e-2)  # bfloat16 has 8 mantissa bits.
    for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32), strict=True):
        assert g16.dtype == jnp.float32
        np.testing.assert_allclose(g16, g32, atol=0.05 * float(jnp.max(jnp.abs(g32))) + 1e-6)


def test_bfloat16_is_refused_for_cells_without_a_compute_dtype():
    Config.create(cell="gru", dtype="bfloat16").validate()
    with pytest.raises(UsageError, match="--cell=minlstm computes in float32 only"):
        Config.create(cell="minlstm", dtype="bfloat16").validate()
    with pytest.raises(UsageError, match="--dtype must be one of float32, bfloat16"):
        Config.create(dtype="float16").validate()


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_ln", "slstm"])
def test_remat_gives_the_same_loss_and_gradients(cell):
    sizes = dict(vocab_size=11, embed_dim=16, hidden=32, num_layers=2, cell=cell)
    model, recomputing = make_model(**sizes), make_model(**sizes, remat=True)
    params = init_params(model, jax.random.key(0))
    # Same parameter tree: --remat can be switched on or off when a run resumes.
    assert jax.tree.structure(params) == jax.tree.structure(
        init_params(recomputing, jax.random.key(0))
    )
    tokens = jax.random.randint(jax.random.key(1), (4, 30), 0, 11)

    def loss(model, params):
        _, logits = model.apply({"params": params}, model.initialize_carry(4), tokens)
        targets = jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), 11)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * targets, -1))

    gradient = jax.jit(jax.value_and_grad(loss, 1), static_argnums=0)
    stored, grads = gradient(model, params)
    recomputed, remat_grads = gradient(recomputing, params)
    # The point of --remat: XLA's scratch memory for the step shrinks.
    scratch = {
        m.compute.remat: gradient.lower(m, params).compile().memory_analysis().temp_size_in_bytes
        for m in (model, recomputing)
    }
    assert scratch[True] < 0.7 * scratch[False], scratch
    np.testing.assert_allclose(recomputed, stored, rtol=1e-6)
    for remat_grad, grad in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(remat_grad, grad, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(grads["logits"]["kernel"]))) > 0


def test_remat_is_refused_for_a_cell_without_a_step_by_step_scan():
    Config.create(cell="gru", remat=True).validate()
    with pytest.raises(UsageError, match="--cell=minlstm computes all time steps at once"):
        Config.create(cell="minlstm", remat=True).validate()
