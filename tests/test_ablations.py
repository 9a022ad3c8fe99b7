"""Ablation switches: each changes the parameters and the maths exactly as its flag says."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import make_model

from lstm_jax.config import Config, complete_settings
from lstm_jax.errors import UsageError
from lstm_jax.models import CharLSTM, build_model, count_params, init_params, model_from_settings
from lstm_jax.train import train_and_evaluate

VOCAB = 11
TOKENS = jax.random.randint(jax.random.key(7), (3, 9), 0, VOCAB)


def _model(**changes) -> CharLSTM:
    return make_model(VOCAB, **{"embed_dim": 5, "hidden": 6, "num_layers": 2, **changes})


def _logits(model, params, carry=None):
    carry = model.initialize_carry(TOKENS.shape[0]) if carry is None else carry
    return model.apply({"params": params}, carry, TOKENS)[1]


def _shapes(params):
    return jax.tree.map(lambda x: x.shape, params)


def test_residual_adds_no_parameters_and_passes_the_input_around_a_silent_layer():
    plain, residual = _model(), _model(residual=True)
    params = init_params(residual, jax.random.key(0))
    assert _shapes(params) == _shapes(init_params(plain, jax.random.key(0)))
    # An LSTM with all-zero weights outputs zeros from a zero state, so with the skip the second
    # layer hands on the first layer's output unchanged: the model is then its one-layer self.
    params["lstm_1"] = jax.tree.map(jnp.zeros_like, params["lstm_1"])
    one_layer = _model(num_layers=1)
    one_layer_params = {k: v for k, v in params.items() if k != "lstm_1"}
    np.testing.assert_allclose(
        _logits(residual, params), _logits(one_layer, one_layer_params), rtol=1e-6, atol=1e-6
    )
    assert not np.allclose(_logits(plain, params), _logits(residual, params))


def test_layer_norm_normalises_every_layer_output():
    model = _model(layer_norm=True)
    params = init_params(model, jax.random.key(0))
    assert set(params) == {"embed", "lstm_0", "norm_0", "lstm_1", "norm_1", "logits"}
    assert _shapes(params["norm_1"]) == {"scale": (6,), "bias": (6,)}
    _, state = model.apply(
        {"params": params},
        model.initialize_carry(3),
        TOKENS,
        capture_intermediates=lambda module, _: isinstance(module, nn.LayerNorm),
        mutable=["intermediates"],
    )
    for name in ("norm_0", "norm_1"):
        (y,) = state["intermediates"][name]["__call__"]
        assert y.shape == (3, 9, 6)
        np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
        np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-2)  # LayerNorm's epsilon.


def test_embed_dim_sizes_the_table_and_zero_feeds_one_hot_characters():
    params = init_params(_model(embed_dim=24), jax.random.key(0))
    assert params["embed"]["embedding"].shape == (VOCAB, 24)
    assert params["lstm_0"]["ii"]["kernel"].shape == (24, 6)
    one_hot = _model(embed_dim=0)
    one_hot_params = init_params(one_hot, jax.random.key(0))
    assert "embed" not in one_hot_params
    assert one_hot_params["lstm_0"]["ii"]["kernel"].shape == (VOCAB, 6)
    # One-hot input is an embedding whose table is the identity.
    identity = {**one_hot_params, "embed": {"embedding": jnp.eye(VOCAB)}}
    np.testing.assert_allclose(
        _logits(one_hot, one_hot_params),
        _logits(_model(embed_dim=VOCAB), identity),
        rtol=1e-6,
        atol=1e-6,
    )


def test_tied_embeddings_compute_logits_with_the_embedding_table():
    tied, untied = _model(embed_dim=6, tie_embeddings=True), _model(embed_dim=6)
    params = init_params(tied, jax.random.key(0))
    assert "logits" not in params and params["logits_bias"].shape == (VOCAB,)
    untied_count = count_params(init_params(untied, jax.random.key(0)))
    assert count_params(params) == untied_count - 6 * VOCAB
    params["logits_bias"] = jnp.arange(VOCAB, dtype=jnp.float32)
    (_, logits), state = tied.apply(
        {"params": params},
        tied.initialize_carry(3),
        TOKENS,
        capture_intermediates=lambda module, _: isinstance(module, nn.Dropout),
        mutable=["intermediates"],
    )
    # The last dropout (off here) sees the top layer's output, which the output layer takes.
    (top,) = state["intermediates"]["Dropout_1"]["__call__"]
    expected = top @ params["embed"]["embedding"].T + params["logits_bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_need_embed_dim_equal_to_hidden():
    with pytest.raises(UsageError, match="--tie_embeddings needs --embed_dim equal to --hidden"):
        Config.create(tie_embeddings=True, embed_dim=64, hidden=512).validate()
    Config.create(tie_embeddings=True, embed_dim=512, hidden=512).validate()


@pytest.mark.parametrize(
    "dropout_at, second_layer_sees_dropout", [("between", True), ("output", False)]
)
def test_dropout_at_output_leaves_every_layer_alone(dropout_at, second_layer_sees_dropout):
    model = _model(dropout=0.5, dropout_at=dropout_at)
    params = init_params(model, jax.random.key(0))
    carry = model.initialize_carry(3)
    eval_carry, eval_logits = model.apply({"params": params}, carry, TOKENS)
    train_carry, train_logits = model.apply(
        {"params": params}, carry, TOKENS, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    # The first layer never sees dropout; the second does only with "between"; the output always.
    np.testing.assert_array_equal(eval_carry[0][1], train_carry[0][1])
    assert (not np.allclose(eval_carry[1][1], train_carry[1][1])) == second_layer_sees_dropout
    assert not np.allclose(eval_logits, train_logits)


@pytest.mark.parametrize("variational", [False, True])
def test_variational_dropout_keeps_one_mask_for_the_whole_sequence(variational):
    model = _model(dropout=0.5, variational_dropout=variational)
    params = init_params(model, jax.random.key(0))
    _, state = model.apply(
        {"params": params},
        model.initialize_carry(3),
        TOKENS,
        deterministic=False,
        rngs={"dropout": jax.random.key(1)},
        capture_intermediates=lambda module, _: isinstance(module, nn.Dropout),
    )
    outputs = jax.tree.leaves(state["intermediates"])
    assert len(outputs) == 2  # Between the layers, and before the output layer.
    for dropped in outputs:
        zeros = np.asarray(dropped) == 0  # [batch, time, features]; LSTM outputs are never 0.
        assert 0.3 < zeros.mean() < 0.7
        same_over_time = (zeros == zeros[:, :1]).all()
        assert same_over_time == variational


def test_bad_dropout_at_is_a_usage_error():
    with pytest.raises(UsageError, match="--dropout_at must be one of between, output"):
        Config.create(dropout_at="inputs").validate()


def test_sampling_rebuilds_the_model_with_every_model_setting():
    config = Config.create(
        cell="gru", embed_dim=0, residual=True, layer_norm=True, hidden=32, dropout_at="output"
    )
    built = build_model(config, VOCAB)
    rebuilt = model_from_settings(config.run_settings(), VOCAB)
    assert rebuilt.config == built.config == config.model
    assert (rebuilt.vocab_size, rebuilt.regularization.dropout_at) == (VOCAB, "between")


def test_checkpoints_from_before_the_ablations_still_resume_as_plain_lstms():
    now = Config().run_settings()
    old = {
        k: v
        for k, v in now.items()
        if k not in ("cell", "residual", "layer_norm", "tie_embeddings")
    }
    assert complete_settings(old) == now
    model = model_from_settings(old, VOCAB)
    assert (c := model.config) and (c.cell, c.residual, c.layer_norm, c.tie_embeddings) == (
        "lstm",
        False,
        False,
        False,
    )


def test_all_ablations_together_train_and_sample(tiny_config, fast_compile):
    config = tiny_config.replace(
        embed_dim=16, residual=True, layer_norm=True, tie_embeddings=True, dropout=0.1
    )
    config = config.replace(dropout_at="output")
    result = train_and_evaluate(config, devices=jax.local_devices()[:2])
    assert result.train_losses[-1] < result.train_losses[0]
    assert {"norm_0", "norm_1", "logits_bias"} <= set(result.params)
