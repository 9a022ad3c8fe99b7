"""--hoist_input: the input projection of all time steps as one matmul before each layer's scan
gives what the step-by-step cell gives. Equal within float32 rounding, rtol 1e-5, atol 1e-5 (the
one big product sums in another order than the per-step ones)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import make_model
from test_scan import _assert_close, _inputs, _run

from lstm_jax.config import Config
from lstm_jax.errors import UsageError
from lstm_jax.models import init_params
from lstm_jax.train import train_and_evaluate

pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest.py
VOCAB = 11
VARIANTS = {
    "1 layer": dict(num_layers=1),
    "2 layers": dict(num_layers=2),
    "2 layers, remat, unroll 4": dict(num_layers=2, remat=True, unroll=4),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hoisting_gives_the_same_logits_carry_and_gradients(variant):
    sizes = dict(vocab_size=VOCAB, embed_dim=8, hidden=16, **VARIANTS[variant])
    plain = make_model(**sizes)
    params = init_params(plain, jax.random.key(0))
    tokens, carry = _inputs(plain)  # A non-zero incoming carry.
    hoisted = make_model(**sizes, hoist_input=True)
    shapes = jax.eval_shape(functools.partial(init_params, hoisted), jax.random.key(0))
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
    want = _run(plain, params, carry, tokens)
    _assert_close(_run(hoisted, params, carry, tokens), want)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(want["grads"]))


def test_hoisting_keeps_the_weight_drop_masks_and_bfloat16():
    sizes = dict(vocab_size=VOCAB, embed_dim=8, hidden=16, num_layers=2, weight_drop=0.3)
    plain = make_model(**sizes)
    params = init_params(plain, jax.random.key(0))
    tokens, carry = _inputs(plain)
    want = _run(plain, params, carry, tokens, rng=jax.random.key(5))
    hoisted = make_model(**sizes, hoist_input=True)
    _assert_close(_run(hoisted, params, carry, tokens, rng=jax.random.key(5)), want)
    evaluation = _run(hoisted, params, carry, tokens)  # Not vacuous: the mask acts.
    assert not np.allclose(evaluation["logits"], want["logits"], atol=1e-3)
    half = dict(vocab_size=VOCAB, embed_dim=8, hidden=16, num_layers=2, dtype="bfloat16")
    want = _run(make_model(**half), params, carry, tokens)
    got = _run(make_model(**half, hoist_input=True), params, carry, tokens)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=0.05)
    assert jax.tree.map(lambda x: x.dtype, got["carry"]) == jax.tree.map(
        lambda x: x.dtype, want["carry"]
    )


def test_a_plain_checkpoint_resumes_hoisted(tiny_config, tmp_path):
    config = tiny_config.replace(schedule="constant", eval_every=4)
    devices = jax.local_devices()[:1]
    straight = train_and_evaluate(config.replace(workdir=str(tmp_path / "a")), devices=devices)
    interrupted = config.replace(workdir=str(tmp_path / "b"))
    train_and_evaluate(interrupted.replace(num_steps=4), devices=devices)
    resumed = train_and_evaluate(interrupted.replace(hoist_input=True), devices=devices)
    assert resumed.step == 8
    np.testing.assert_allclose(resumed.val_loss, straight.val_loss, rtol=1e-5)
    for got, want in zip(
        jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_hoisting_is_refused_where_it_does_not_apply():
    with pytest.raises(UsageError, match="--hoist_input needs a cell that hoists \\(lstm\\)"):
        Config.create(cell="gru", hoist_input=True).validate()
    with pytest.raises(UsageError, match="--hoist_input is for --scan=layered"):
        Config.create(hoist_input=True, scan="wavefront").validate()
