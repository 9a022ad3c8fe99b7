"""--scan and --unroll: the layer wavefront computes what the layered scans compute.

Equal means within float32 rounding, rtol 1e-5 and atol 1e-5 (XLA orders the sums of a fused
loop differently, so the two paths differ in the last bits: up to 9e-6 on logits near 1).
Dropout is compared too: the wavefront draws the layered path's masks (same modules, same keys)
and feeds them to the scan, so training runs are equal, not only evaluation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import make_model

from lstm_jax.cells import CELLS, cell_steps_in_scan
from lstm_jax.config import Config
from lstm_jax.errors import UsageError
from lstm_jax.models import init_params
from lstm_jax.train import train_and_evaluate

pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest.py
STEPPING = [name for name in CELLS if cell_steps_in_scan(name)]
VOCAB, BATCH = 11, 3
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VARIANTS = {  # Each against the layered path without remat or unroll.
    "1 layer": dict(num_layers=1),
    "2 layers": dict(num_layers=2),
    "3 layers, layer norm, residual": dict(num_layers=3, layer_norm=True, residual=True),
    "2 layers, remat, unroll 4": dict(num_layers=2, remat=True, unroll=4),
}
# Every stepping cell at 2 layers in CI; the other variants in CI for lstm and mogrifier (the
# recipes' cells), for the rest under `-m slow` (the suite's 10-minute budget).
CELL_VARIANTS = [
    pytest.param(
        cell,
        variant,
        id=f"{cell}-{variant}",
        marks=[] if variant == "2 layers" or cell in ("lstm", "mogrifier") else [pytest.mark.slow],
    )
    for cell in STEPPING
    for variant in VARIANTS
]


@functools.partial(jax.jit, static_argnums=0)
def _run(model, params, carry, tokens, rng=None):
    """Loss (next character), its gradients w.r.t. the parameters, logits and final carry."""
    train = rng is not None

    def loss(params):
        new_carry, logits = model.apply(
            {"params": params},
            carry,
            tokens,
            deterministic=not train,
            rngs={"dropout": rng} if train else {},
        )
        targets = jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), VOCAB)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * targets, -1)), (logits, new_carry)

    (value, (logits, new_carry)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return {"loss": value, "logits": logits, "carry": new_carry, "grads": grads}


def _assert_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for name in want:
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]), strict=True):
            np.testing.assert_allclose(a, b, **TOLERANCE, err_msg=name)


def _inputs(model, length=12):
    """Random characters and a non-zero incoming carry (as a carried state is)."""
    tokens = jax.random.randint(jax.random.key(1), (BATCH, length), 0, VOCAB)
    zeros = model.initialize_carry(BATCH)
    leaves, tree = jax.tree.flatten(zeros)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    # Positive, so that sLSTM's normaliser state n is a possible one.
    carry = [
        0.5 * jnp.abs(jax.random.normal(k, x.shape)) + 0.1
        for k, x in zip(keys, leaves, strict=True)
    ]
    return tokens, jax.tree.unflatten(tree, carry)


@pytest.mark.parametrize("cell, variant", CELL_VARIANTS)
def test_wavefront_gives_the_layered_logits_carry_and_gradients(cell, variant):
    sizes = dict(vocab_size=VOCAB, embed_dim=8, hidden=16, cell=cell, **VARIANTS[variant])
    layered = make_model(**{**sizes, "remat": False, "unroll": 1})
    params = init_params(layered, jax.random.key(0))
    tokens, carry = _inputs(layered)
    want = _run(layered, params, carry, tokens)
    for scan in ("layered", "wavefront"):
        model = make_model(**sizes, scan=scan)
        # The same parameter tree, names and shapes: a run may switch --scan when it resumes.
        shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
        _assert_close(_run(model, params, carry, tokens), want)
    # Not vacuous: every parameter gets a gradient.
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(want["grads"]))


@pytest.mark.parametrize("variational", [False, True])
def test_wavefront_draws_the_layered_dropout_masks(variational):
    # Every random draw in the model: embedding, input, between-layer and output dropout, and
    # the recurrent kernels' DropConnect; a training run is the same under either --scan.
    sizes = dict(
        vocab_size=VOCAB, embed_dim=8, hidden=16, num_layers=3, residual=True, dropout=0.3,
        variational_dropout=variational, embed_dropout=0.1, input_dropout=0.1, weight_drop=0.2,
    )  # fmt: skip
    layered, wavefront = make_model(**sizes), make_model(**sizes, scan="wavefront")
    params = init_params(layered, jax.random.key(0))
    tokens, carry = _inputs(layered)
    want = _run(layered, params, carry, tokens, rng=jax.random.key(5))
    _assert_close(_run(wavefront, params, carry, tokens, rng=jax.random.key(5)), want)
    # Not vacuous: the masks change the result, and another key draws other masks.
    evaluation = _run(wavefront, params, carry, tokens)
    other_key = _run(wavefront, params, carry, tokens, rng=jax.random.key(6))
    assert not np.allclose(evaluation["logits"], want["logits"], atol=1e-3)
    assert not np.allclose(other_key["logits"], want["logits"], atol=1e-3)


def test_wavefront_with_fewer_time_steps_than_layers_and_in_bfloat16():
    # Sampling feeds one character at a time: all iterations of the wavefront are partial.
    sizes = dict(vocab_size=VOCAB, embed_dim=8, hidden=16, num_layers=3)
    layered = make_model(**sizes)
    params = init_params(layered, jax.random.key(0))
    tokens, carry = _inputs(layered, length=1)
    want = _run(layered, params, carry, tokens)
    _assert_close(_run(make_model(**sizes, scan="wavefront"), params, carry, tokens), want)
    # bfloat16 layer outputs travel between layers in bfloat16, as in the layered path.
    half = {**sizes, "dtype": "bfloat16"}
    tokens, carry = _inputs(layered, length=8)
    want = _run(make_model(**half), params, carry, tokens)
    got = _run(make_model(**half, scan="wavefront"), params, carry, tokens)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=0.05)


def test_remat_shrinks_the_wavefront_step_memory_as_it_does_the_layered():
    def scratch(**settings):
        model = make_model(VOCAB, embed_dim=16, hidden=32, num_layers=2, **settings)
        params = init_params(model, jax.random.key(0))
        tokens, carry = _inputs(model, length=30)
        compiled = _run.lower(model, params, carry, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    for scan in ("layered", "wavefront"):
        stored, recomputed = scratch(scan=scan), scratch(scan=scan, remat=True)
        assert recomputed < 0.7 * stored, (scan, stored, recomputed)


def test_a_layered_checkpoint_resumes_with_the_wavefront(tiny_config, tmp_path):
    # --scan is a compute setting, not saved as a model setting: a run may switch it. A constant
    # schedule, so that stopping at step 4 (then resuming to 8) is the uninterrupted run.
    config = tiny_config.replace(dropout=0.2, schedule="constant", eval_every=4)
    devices = jax.local_devices()[:1]
    straight = train_and_evaluate(config.replace(workdir=str(tmp_path / "a")), devices=devices)
    interrupted = config.replace(workdir=str(tmp_path / "b"))
    train_and_evaluate(interrupted.replace(num_steps=4), devices=devices)
    resumed = train_and_evaluate(interrupted.replace(scan="wavefront"), devices=devices)
    assert resumed.step == 8
    np.testing.assert_allclose(resumed.train_losses[-1], straight.train_losses[-1], rtol=1e-5)
    np.testing.assert_allclose(resumed.val_loss, straight.val_loss, rtol=1e-5)
    for got, want in zip(
        jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_wavefront_and_unroll_are_refused_for_a_cell_that_does_not_step():
    Config.create(cell="gru", scan="wavefront", unroll=4).validate()
    for flag, setting in [("--scan=wavefront", {"scan": "wavefront"}), ("--unroll", {"unroll": 2})]:
        with pytest.raises(UsageError, match=f"{flag} needs a step-by-step scan.*--cell=minlstm"):
            Config.create(cell="minlstm", **setting).validate()
    with pytest.raises(UsageError, match="--scan must be one of layered, wavefront"):
        Config.create(scan="diagonal").validate()
    with pytest.raises(UsageError, match="--unroll"):
        Config.create(unroll=0).validate()
