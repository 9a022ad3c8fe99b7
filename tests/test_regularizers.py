"""AWD-LSTM's regularisers and the parameter average, checked on their masks and closed forms.

Each dropped model must be *exactly* an undropped model with masked weights or inputs: a mask
that changed from one time step to the next, or from one sequence to another, would not be
reproducible by any single masked weight, so these equalities pin down the masks' sharing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import make_model

from lstm_jax.cells import CELLS
from lstm_jax.config import Config
from lstm_jax.errors import UsageError
from lstm_jax.models import init_params
from lstm_jax.steps import create_train_state, train_step

VOCAB = 13
TOKENS = jax.random.randint(jax.random.key(7), (4, 9), 0, VOCAB)


def _apply(model, params, *, train: bool, key: int = 0):
    carry = model.initialize_carry(TOKENS.shape[0])
    rngs = {"dropout": jax.random.key(key)} if train else None
    return model.apply(
        {"params": params}, carry, TOKENS, deterministic=not train, rngs=rngs
    )[1]


def _kernel_masks(model, params, key: int) -> dict:
    """Which recurrent-kernel entries the dropped model uses: those with a non-zero gradient."""
    grads = jax.grad(lambda p: _apply(model, p, train=True, key=key).sum())(params)
    return grads


@pytest.mark.parametrize("cell", [name for name in CELLS if CELLS[name].recurrent_kernels])
def test_weight_drop_is_one_recurrent_kernel_mask_per_step_for_all_time_steps(cell):
    rate = 0.5
    model = make_model(VOCAB, cell=cell, embed_dim=6, hidden=8, num_layers=2, weight_drop=rate)
    params = init_params(model, jax.random.key(1))
    grads = _kernel_masks(model, params, key=3)
    masked = jax.tree.map(np.array, params)
    kept_fractions = []
    for layer in (f"{cell}_0", f"{cell}_1"):
        for path in CELLS[cell].recurrent_kernels:
            *scopes, leaf = path.split("/")
            grad, holder = grads[layer], masked[layer]
            for name in scopes:
                grad, holder = grad[name], holder[name]
            keep = np.asarray(grad[leaf]) != 0
            kept_fractions.append(keep.mean())
            holder[leaf] = np.where(keep, holder[leaf] / (1 - rate), 0.0)
    # About half of every kernel is dropped (64 entries each: within 4.5 binomial sd).
    assert all(abs(f - 0.5) < 4.5 * 0.5 / 8 for f in kept_fractions), kept_fractions
    # The dropped model is exactly the undropped one with those kernels masked and rescaled:
    # so one mask served every time step and every sequence.
    np.testing.assert_allclose(
        _apply(model, params, train=True, key=3),
        _apply(model, masked, train=False),
        rtol=1e-5,
        atol=1e-6,
    )
    # The input kernels are never dropped, evaluation drops nothing, and each layer and each
    # optimizer step (another dropout key) draws its own mask.
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        recurrent = any(k in name for k in _recurrent_names(cell))
        if f"{cell}_" in name and np.ndim(grad) == 2 and not recurrent:
            assert np.count_nonzero(np.asarray(grad)) > 0.9 * np.size(grad), name
    plain = make_model(VOCAB, cell=cell, embed_dim=6, hidden=8, num_layers=2)
    np.testing.assert_array_equal(
        _apply(model, params, train=False), _apply(plain, params, train=False)
    )
    other = _kernel_masks(model, params, key=4)
    first_kernel = CELLS[cell].recurrent_kernels[0].split("/")
    a, b, c = grads[f"{cell}_0"], grads[f"{cell}_1"], other[f"{cell}_0"]
    for name in first_kernel:
        a, b, c = a[name], b[name], c[name]
    assert not np.array_equal(np.asarray(a) != 0, np.asarray(b) != 0)
    assert not np.array_equal(np.asarray(a) != 0, np.asarray(c) != 0)


def _recurrent_names(cell: str) -> list[str]:
    return [f"'{path.split('/')[0]}'" for path in CELLS[cell].recurrent_kernels]


def test_weight_drop_is_refused_for_a_cell_without_recurrent_kernels():
    with pytest.raises(UsageError, match="--weight_drop drops recurrent kernels"):
        Config.create(cell="minlstm", weight_drop=0.3).validate()


def test_embedding_dropout_drops_whole_characters_in_all_their_occurrences():
    rate = 0.5
    model = make_model(VOCAB, embed_dim=6, hidden=8, num_layers=1, embed_dropout=rate)
    params = init_params(model, jax.random.key(1))
    grads = jax.grad(lambda p: _apply(model, p, train=True, key=5).sum())(params)
    row_used = np.abs(np.asarray(grads["embed"]["embedding"])).sum(1) != 0
    present = np.zeros(VOCAB, bool)
    present[np.asarray(TOKENS).ravel()] = True
    dropped = present & ~row_used
    assert dropped.any() and (present & row_used).any(), (present, row_used)
    # Exactly the model whose embedding table has the dropped rows zeroed, the rest scaled.
    table = np.asarray(params["embed"]["embedding"])
    masked = {**params, "embed": {"embedding": np.where(row_used[:, None], table / (1 - rate), 0)}}
    np.testing.assert_allclose(
        _apply(model, params, train=True, key=5),
        _apply(model, masked, train=False),
        rtol=1e-5,
        atol=1e-6,
    )
    plain = make_model(VOCAB, embed_dim=6, hidden=8, num_layers=1)
    np.testing.assert_array_equal(
        _apply(model, params, train=False), _apply(plain, params, train=False)
    )


@pytest.mark.parametrize("variational", [False, True])
def test_input_dropout_masks_the_embedded_input(variational):
    rate = 0.5
    model = make_model(
        VOCAB, embed_dim=32, hidden=8, num_layers=1, input_dropout=rate,
        variational_dropout=variational,
    )  # fmt: skip
    params = init_params(model, jax.random.key(1))
    carry = model.initialize_carry(TOKENS.shape[0])
    _, state = model.apply(
        {"params": params}, carry, TOKENS, deterministic=False,
        rngs={"dropout": jax.random.key(2)}, capture_intermediates=True,
    )  # fmt: skip
    dropped = np.asarray(state["intermediates"]["input_dropout"]["__call__"][0])
    embedded = np.asarray(params["embed"]["embedding"])[np.asarray(TOKENS)]
    keep = dropped != 0
    np.testing.assert_allclose(dropped[keep], embedded[keep] / (1 - rate), rtol=1e-6)
    assert abs(keep.mean() - 0.5) < 0.1, keep.mean()
    # Variational: one mask per sequence, the same at every time step; else a new one.
    same_over_time = (keep == keep[:, :1]).all()
    assert same_over_time == variational


def test_the_parameter_average_follows_its_closed_form_and_is_off_by_default():
    decay = 0.9
    config = Config.create(
        embed_dim=4, hidden=8, num_layers=1, dropout=0.0, ema_decay=decay, learning_rate=0.05,
        warmup_steps=0, schedule="constant",
    )  # fmt: skip
    model = make_model(VOCAB, **{"embed_dim": 4, "hidden": 8, "num_layers": 1})
    params = init_params(model, jax.random.key(0))
    state = create_train_state(model, params, config.optim, 100, jax.random.key(1))
    expected = jax.tree.map(np.asarray, params)
    carry = model.initialize_carry(TOKENS.shape[0])
    step = jax.jit(train_step)
    for t in range(25):  # Past the warm-up of the decay, (1 + t) / (10 + t) < 0.9 until t = 80.
        state, carry, _ = step(state, TOKENS, carry, jnp.asarray(t == 0))
        d = min(decay, (1 + t) / (10 + t))
        expected = jax.tree.map(
            lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), expected, state.params
        )
    for got, want in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])
    off = create_train_state(model, params, Config.create().optim, 100, jax.random.key(1))
    assert off.ema_params is None
