"""Blocks (`--block`): prenorm trains pmapped, resumes and samples for any cell; its arithmetic is
x + cell(norm(x)) then x + gated MLP(norm(x)), against a reference written out here; FLOPs and
the memory estimate count its matmuls; the settings it cannot take are refused in one line."""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import ci_or_slow, make_model
from test_cells import _sample_by_hand, _sample_from_checkpoint

from lstm_jax import memory
from lstm_jax.blocks import BLOCKS
from lstm_jax.cells import CELLS
from lstm_jax.config import Config
from lstm_jax.errors import UsageError
from lstm_jax.models import count_params, forward_flops_per_char, init_params
from lstm_jax.train import train_and_evaluate

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest.py


# The block is the same code around every cell: CI trains it around the LSTM, the other cells run
# with -m slow (each cell's own training is in test_cells.py).
@pytest.mark.parametrize("cell", ci_or_slow(["lstm", "rglru", "mlstm", "attention"], ["lstm"]))
def test_prenorm_trains_pmapped_resumes_and_samples(tiny_config, cell):
    # tiny_config: embed_dim 8, hidden 16, so the embedding is projected to the stream once.
    config = tiny_config.replace(
        cell=cell, block="prenorm", mlp_ratio=2.0, num_steps=8, checkpoint_every=8, eval_every=8
    )
    devices = jax.local_devices()[:2]
    first = train_and_evaluate(config, devices=devices)
    resumed = train_and_evaluate(config.replace(num_steps=12), devices=devices)
    assert resumed.step == 12
    losses = first.train_losses + resumed.train_losses
    assert losses[-1] < losses[0], losses
    per_layer = {f"{cell}_{i}" for i in (0, 1)} | {f"{name}_{i}" for name in (
        "cell_norm", "mlp", "mlp_norm") for i in (0, 1)}  # fmt: skip
    assert set(first.params) == {"embed", "embed_projection", "final_norm", "logits"} | per_layer
    assert first.params["mlp_0"]["up"]["kernel"].shape == (16, 32)  # mlp_ratio 2 x hidden 16.
    text, vocab = _sample_from_checkpoint(config.loop.workdir, "The ", 60, seed=3)
    assert text == _sample_by_hand(config, resumed.params, vocab, "The ", 60, seed=3)


@pytest.mark.parametrize(
    "cell", ci_or_slow(["gru", "rglru", "mlstm", "attention"], ["gru", "attention"])
)
def test_prenorm_over_a_sequence_equals_stepping_one_character_at_a_time(cell):
    # The MLP and the norms act per character: the block keeps the cell's carry as it is.
    model = make_model(11, embed_dim=5, hidden=7, num_layers=2, cell=cell, block="prenorm")
    params = init_params(model, jax.random.key(1))
    prefix = jax.random.randint(jax.random.key(3), (4, 17), 0, 11)
    start, _ = model.apply({"params": params}, model.initialize_carry(4), prefix)
    tokens = jax.random.randint(jax.random.key(2), (4, 13), 0, 11)
    carry_scan, logits_scan = model.apply({"params": params}, start, tokens)
    carry, stepped = start, []
    for t in range(tokens.shape[1]):
        carry, logits = model.apply({"params": params}, carry, tokens[:, t : t + 1])
        stepped.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(stepped, 1), logits_scan, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(carry_scan), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _rms_norm(x, scale):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale


def _gelu(x):  # The tanh approximation, flax.linen.gelu's default.
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _dense(x, params):
    return x @ params["kernel"] + params["bias"]


def test_prenorm_is_x_plus_cell_of_norm_then_x_plus_gated_mlp_of_norm():
    model = make_model(11, embed_dim=5, hidden=6, num_layers=2, cell="gru", block="prenorm")
    params = init_params(model, jax.random.key(0))
    # Norm scales start at one and biases at zero: move every leaf so each one matters.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    tokens = jax.random.randint(jax.random.key(2), (3, 7), 0, 11)
    carry = tuple(0.5 * jax.random.normal(jax.random.key(3 + i), (3, 6)) for i in range(2))
    new_carry, logits = model.apply({"params": params}, carry, tokens)

    p = jax.tree.map(np.asarray, params)
    x = _dense(p["embed"]["embedding"][np.asarray(tokens)], p["embed_projection"])
    gru = CELLS["gru"](6)
    for layer in range(2):
        normed = _rms_norm(x, p[f"cell_norm_{layer}"]["scale"])
        # The cell itself is tested elsewhere: here it is the branch, applied on its own.
        layer_carry, y = gru.apply(
            {"params": params[f"gru_{layer}"]}, carry[layer], jnp.asarray(normed, jnp.float32),
            method="scan",
        )  # fmt: skip
        np.testing.assert_allclose(new_carry[layer], layer_carry, rtol=1e-5, atol=1e-6)
        x = x + np.asarray(y)
        mlp, m = p[f"mlp_{layer}"], _rms_norm(x, p[f"mlp_norm_{layer}"]["scale"])
        x = x + _dense(_gelu(_dense(m, mlp["gate"])) * _dense(m, mlp["up"]), mlp["down"])
    want = _dense(_rms_norm(x, p["final_norm"]["scale"]), p["logits"])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("embed_dim", [8, 16])  # 16 = hidden: prenorm projects nothing.
def test_flops_per_char_count_every_kernel_of_the_block_once(block, embed_dim):
    """Every matmul weight is used once per character in a multiply-add: 2 FLOPs per kernel
    entry (the embedding is a lookup, not a matmul)."""
    config = Config.create(cell="lstm", block=block, embed_dim=embed_dim, hidden=16, num_layers=3)
    model = make_model(40, cell="lstm", block=block, embed_dim=embed_dim, hidden=16, num_layers=3)
    shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    kernels = [
        leaf.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
        if leaf.ndim == 2 and path[0].key != "embed"
    ]
    assert forward_flops_per_char(config.model, 40) == 2 * sum(kernels)


def test_memory_estimate_counts_the_prenorm_parameters():
    config = Config.create(cell="gru", block="prenorm", hidden=128, num_layers=2, mlp_ratio=4.0)
    model = make_model(96, cell="gru", block="prenorm", hidden=128, num_layers=2, mlp_ratio=4.0)
    shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    weights = memory.training_bytes(config, 96)["weights"]
    assert weights == pytest.approx(4 * 4 * count_params(shapes), rel=0.03)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mlp_ratio": 2.0}, "--mlp_ratio sizes --block=prenorm's MLP; add --block=prenorm"),
        ({"block": "prenorm", "residual": True}, "own residual adds and norms; drop --residual"),
        ({"block": "prenorm", "layer_norm": True}, "own residual adds and norms; drop --layer_n"),
        ({"block": "prenorm", "scan": "wavefront"}, "--scan=wavefront runs --block=plain only"),
        ({"block": "postnorm"}, "--block must be one of plain, prenorm, got 'postnorm'"),
    ],
)
def test_what_a_block_cannot_take_is_refused_in_one_line(settings, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as error:
        Config.create(**settings).validate()
    assert "\n" not in str(error.value)


def test_prenorm_command_line_refusal_is_one_line_without_traceback(tmp_path):
    from subprocesses import run_module

    result = run_module(
        "lstm_jax.main", f"--workdir={tmp_path / 'run'}", "--mlp_ratio=2", timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --mlp_ratio sizes --block=prenorm's MLP; add --block=prenorm or drop --mlp_ratio."
    )


def test_extending_md_add_a_block_example_trains_resumes_and_samples(tiny_config, monkeypatch):
    import flax.linen as nn

    from lstm_jax import blocks

    section = EXTENDING.read_text().split("## Add a block", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace = {"Block": blocks.Block, "PlainBlock": blocks.PlainBlock, "nn": nn}
    exec(compile(source, "docs/extending.md: lstm_jax/blocks.py", "exec"), namespace)
    monkeypatch.setitem(BLOCKS, "postnorm", namespace["PostNormBlock"])  # Its registry line.
    config = tiny_config.replace(block="postnorm", num_steps=8, checkpoint_every=8)
    devices = jax.local_devices()[:2]
    first = train_and_evaluate(config, devices=devices)
    resumed = train_and_evaluate(config.replace(num_steps=12), devices=devices)
    assert resumed.step == 12 and "post_norm_1" in resumed.params
    losses = first.train_losses + resumed.train_losses
    assert losses[-1] < losses[0], losses
    text, vocab = _sample_from_checkpoint(config.loop.workdir, "The ", 60, seed=3)
    assert text == _sample_by_hand(config, resumed.params, vocab, "The ", 60, seed=3)
