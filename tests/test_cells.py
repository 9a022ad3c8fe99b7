"""Cells: every registered cell trains (pmapped, carried state), resumes and samples; scanning
equals stepping; minLSTM's parallel form equals its sequential one; README's example cell works."""

import functools
import re
import sys
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import ci_or_slow, make_model
from references import cross_entropy_sum

from lstm_jax.cells import CELLS, Cell
from lstm_jax.cells.minlstm import MinLSTM
from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.config import Config
from lstm_jax.data import Vocab
from lstm_jax.errors import UsageError, UserError
from lstm_jax.generate import sample_text
from lstm_jax.models import build_model, init_params, model_from_settings
from lstm_jax.train import train_and_evaluate

README = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest.py


def _sample_from_checkpoint(workdir: str, prompt: str, length: int, seed: int) -> tuple[str, Vocab]:
    """What `python -m lstm_jax.sample` does: the model from the saved settings, params only."""
    checkpoints = Checkpoints(workdir, read_only=True)
    step = checkpoints.resolve("latest")
    meta = checkpoints.read_meta(step)
    vocab = Vocab(meta["vocab"])
    model = model_from_settings(meta["settings"], vocab.size)
    abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    device = jax.local_devices()[0]
    params = checkpoints.restore_params(
        step, abstract_like(abstract, jax.sharding.SingleDeviceSharding(device))
    )
    (text,) = sample_text(model, params, vocab, prompt, length=length, temperature=1.0, seed=seed)
    return text, vocab


def _sample_by_hand(config: Config, params, vocab: Vocab, prompt: str, length: int, seed: int):
    """Each character drawn from the trained model's distribution after the prompt and the
    characters before it, one `model.apply` per character; character i uses key i of
    `jax.random.split(jax.random.key(seed), length)`, as `lstm_jax.sample.generate` does."""
    model = build_model(config, vocab.size)
    carry, logits = model.apply(
        {"params": params}, model.initialize_carry(1), jnp.asarray(vocab.encode(prompt)[None])
    )
    apply = jax.jit(model.apply)  # The same computation, compiled once instead of op by op.
    out = []
    for key in jax.random.split(jax.random.key(seed), length):
        token = jax.random.categorical(key, logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(int(token[0]))
        carry, logits = apply({"params": params}, carry, token[:, None])
    return vocab.decode(out)


# CI trains, resumes and samples the cells whose carries differ most (a vector pair, a 1-D
# convolution's window beside the state, a matrix memory); the others run with -m slow, and each
# cell's own step is checked against stepping in CI below. Attention's window carry is trained,
# restored and scored in CI by test_new_cells_export_and_load_give_the_checkpoints_logits.
CI_CELLS = ("lstm", "rglru", "mlstm")


@pytest.mark.parametrize("cell", ci_or_slow(CELLS, CI_CELLS))
def test_every_cell_trains_pmapped_resumes_and_samples(tiny_config, cell):
    # Two devices (pmap), the carried state, a checkpoint at step 8 and a resume to step 12:
    # the restore targets come from the cell's own carry and parameter trees.
    config = tiny_config.replace(cell=cell, num_steps=8, checkpoint_every=8, eval_every=8)
    devices = jax.local_devices()[:2]
    first = train_and_evaluate(config, devices=devices)
    resumed = train_and_evaluate(config.replace(num_steps=12), devices=devices)
    assert resumed.step == 12
    losses = first.train_losses + resumed.train_losses
    assert losses[-1] < losses[0], losses
    assert set(first.params) == {"embed", f"{cell}_0", f"{cell}_1", "logits"}
    # The sampler, from the checkpoint alone, draws what the trained model draws step by step.
    text, vocab = _sample_from_checkpoint(config.loop.workdir, "The ", 100, seed=3)
    assert text == _sample_by_hand(config, resumed.params, vocab, "The ", 100, seed=3)


@pytest.mark.parametrize("cell", list(CELLS))
def test_scan_over_sequence_equals_stepping_one_character_at_a_time(cell):
    model = make_model(11, embed_dim=5, hidden=7, num_layers=2, cell=cell)
    params = init_params(model, jax.random.key(1))
    # A state the cell can really be in: what a random prefix leaves behind.
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


def test_minlstm_parallel_scan_equals_sequential_steps_over_a_long_sequence():
    cell = MinLSTM(16)
    xs = jax.random.normal(jax.random.key(0), (3, 500, 8))
    # Any starting state, negative entries included: it enters the parallel form linearly.
    h0 = 2.0 * jax.random.normal(jax.random.key(1), (3, 16))
    params = cell.init(jax.random.key(2), h0, xs[:, 0])["params"]
    h_parallel, ys_parallel = cell.apply({"params": params}, h0, xs, method=MinLSTM.scan)

    def step(h, x):
        return cell.apply({"params": params}, h, x)

    h_sequential, ys_sequential = jax.lax.scan(step, h0, xs.swapaxes(0, 1))
    # Float32, 500 steps in log space: measured max abs difference about 1e-6 on values ~1.
    np.testing.assert_allclose(ys_parallel, ys_sequential.swapaxes(0, 1), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h_parallel, h_sequential, rtol=2e-5, atol=2e-5)


def test_minlstm_trains_without_a_sequential_loop():
    cell = MinLSTM(4)
    xs = jnp.ones((2, 64, 3))
    params = cell.init(jax.random.key(0), jnp.zeros((2, 4)), xs[:, 0])["params"]

    def loss(params):
        _, ys = cell.apply({"params": params}, jnp.zeros((2, 4)), xs, method=MinLSTM.scan)
        return ys.sum()

    primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(jax.grad(loss))(params).eqns}
    assert not primitives & {"scan", "while"}, primitives


def test_dropout_inside_a_cell_draws_a_new_mask_at_every_step():
    class DropoutCell(Cell):
        features: int

        @nn.nowrap
        def init_carry(self, batch_size):
            return jnp.zeros((batch_size, self.features))

        @nn.compact
        def __call__(self, carry, x):
            y = nn.Dropout(0.5)(jnp.ones_like(x), deterministic=False)
            return carry, y

    cell = DropoutCell(8)
    xs = jnp.ones((1, 6, 8))
    _, ys = cell.apply(
        {}, cell.init_carry(1), xs, method=Cell.scan, rngs={"dropout": jax.random.key(0)}
    )
    masks = {tuple(np.asarray(row)) for row in ys[0]}
    assert len(masks) == 6


def test_unknown_cell_is_a_usage_error_listing_the_registered_cells():
    with pytest.raises(UsageError) as error:
        Config.create(cell="transformer").validate()
    assert all(name in str(error.value) for name in CELLS)
    assert "--cell" in str(error.value)


def test_workdir_of_another_cell_is_refused(tiny_config):
    devices = jax.local_devices()[:1]
    train_and_evaluate(tiny_config.replace(num_steps=2), devices=devices)
    with pytest.raises(UserError, match="cell 'lstm' \\(saved\\) vs 'gru' \\(now\\)"):
        train_and_evaluate(tiny_config.replace(num_steps=2, cell="gru"), devices=devices)


def test_readme_add_a_cell_example_trains_and_samples(tiny_config, monkeypatch):
    section = README.read_text().split("## Add a cell", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    module = types.ModuleType("lstm_jax.cells.rnn")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # Dataclasses look it up.
    exec(compile(source, "README.md: lstm_jax/cells/rnn.py", "exec"), module.__dict__)
    monkeypatch.setitem(CELLS, "rnn", module.ElmanRNN)  # The registry line the README adds.
    config = tiny_config.replace(cell="rnn", num_steps=8)
    result = train_and_evaluate(config, devices=jax.local_devices()[:2])
    assert result.train_losses[-1] < result.train_losses[0]
    text, vocab = _sample_from_checkpoint(config.loop.workdir, "The ", 100, seed=3)
    assert text == _sample_by_hand(config, result.params, vocab, "The ", 100, seed=3)


class _PreRegistryCharLSTM(nn.Module):
    """The model as it was before the cell registry, for the test below."""

    vocab_size: int
    embed_dim: int
    hidden: int
    num_layers: int
    dropout: float

    @nn.compact
    def __call__(self, carry, tokens, *, deterministic=True):
        x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
        new_carry = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
            scan_lstm = nn.scan(
                nn.OptimizedLSTMCell,
                variable_broadcast="params",
                split_rngs={"params": False, "dropout": True},
                in_axes=1,
                out_axes=1,
            )
            layer_carry, x = scan_lstm(self.hidden, name=f"lstm_{layer}")(carry[layer], x)
            new_carry.append(layer_carry)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return tuple(new_carry), nn.Dense(self.vocab_size, name="logits")(x)


def test_default_lstm_is_the_pre_registry_model_bit_for_bit():
    sizes = {"vocab_size": 11, "embed_dim": 5, "hidden": 7, "num_layers": 3, "dropout": 0.3}
    old, new = _PreRegistryCharLSTM(**sizes), make_model(**sizes)
    tokens = jax.random.randint(jax.random.key(0), (3, 9), 0, 11)
    carry = jax.tree.map(lambda c: c + 0.1, new.initialize_carry(3))
    old_params = old.init(jax.random.key(1), carry, tokens)["params"]
    new_params = new.init(jax.random.key(1), carry, tokens)["params"]
    assert jax.tree.structure(old_params) == jax.tree.structure(new_params)
    for a, b in zip(jax.tree.leaves(old_params), jax.tree.leaves(new_params), strict=True):
        np.testing.assert_array_equal(a, b)
    rngs = {"dropout": jax.random.key(2)}  # Same masks: the dropout modules kept their names.
    old_out = old.apply({"params": old_params}, carry, tokens, deterministic=False, rngs=rngs)
    new_out = new.apply({"params": old_params}, carry, tokens, deterministic=False, rngs=rngs)
    for a, b in zip(jax.tree.leaves(old_out), jax.tree.leaves(new_out), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rank", [0, 3])
def test_mogrifier_step_is_the_papers_mutual_gating_then_an_lstm_step(rank):
    from lstm_jax.cells.mogrifier import Mogrifier

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    cell = Mogrifier(6, rounds=5, rank=rank)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 4)), np.float64)
    c0, h0 = (np.asarray(jax.random.normal(jax.random.key(k), (2, 6))) for k in (1, 2))
    params = cell.init(jax.random.key(3), (c0, h0), x)["params"]
    (c, h), y = cell.apply({"params": params}, (c0, h0), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def project(v, name):  # Q_i or R_i, low-rank as a product of two thin matrices.
        if rank:
            v = v @ p[f"{name}_down"]["kernel"]
        return v @ p[name]["kernel"]

    xm, hm = x, h0
    for i in range(1, 6):  # Odd rounds gate x by h, even rounds h by x (Melis et al., eq. 1-2).
        if i % 2:
            xm = 2 * sigmoid(project(hm, f"q{i}")) * xm
        else:
            hm = 2 * sigmoid(project(xm, f"r{i}")) * hm
    gates = xm @ p["input"]["kernel"] + p["input"]["bias"] + hm @ p["recurrent"]["kernel"]
    i, f, g, o = np.split(gates, 4, axis=-1)
    c_want = sigmoid(f) * c0 + sigmoid(i) * np.tanh(g)
    h_want = sigmoid(o) * np.tanh(c_want)
    np.testing.assert_allclose(c, c_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, h_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, h_want, rtol=1e-5, atol=1e-6)
    counted = sum(np.size(a) for a in jax.tree.leaves(params) if np.ndim(a) == 2)
    assert cell.flops_per_step(4) == 2 * counted  # Every kernel used once per step.


# --- rglru: Griffin's recurrent block around the RG-LRU (issue 27, item 2) --------------------


def _rglru_start(features: int, conv_width: int, batch: int, input_dim: int, seed: int = 0):
    """An RG-LRU cell, its parameters and a non-zero carry (h and the conv's past inputs)."""
    from lstm_jax.cells.rglru import RGLRU

    cell = RGLRU(features, conv_width=conv_width)
    h0 = jax.random.normal(jax.random.key(seed + 1), (batch, features))
    past = jax.random.normal(jax.random.key(seed + 2), (batch, conv_width - 1, features))
    x0 = jnp.zeros((batch, input_dim))
    params = cell.init(jax.random.key(seed + 3), (h0, past), x0)["params"]
    return cell, params, (h0, past)


def test_rglru_parallel_scan_equals_sequential_steps_from_a_carried_state():
    cell, params, carry = _rglru_start(16, 4, batch=3, input_dim=8)
    xs = jax.random.normal(jax.random.key(0), (3, 400, 8))
    carry_parallel, ys_parallel = cell.apply({"params": params}, carry, xs, method="scan")

    def step(carry, x):
        return cell.apply({"params": params}, carry, x)

    carry_sequential, ys_sequential = jax.lax.scan(step, carry, xs.swapaxes(0, 1))
    # Float32, 400 steps: measured max abs difference 3.6e-7 on outputs up to 2, 1.5e-8 on h
    # (up to 0.2), 0 on the conv inputs.
    np.testing.assert_allclose(ys_parallel, ys_sequential.swapaxes(0, 1), rtol=1e-5, atol=1e-5)
    leaves = zip(jax.tree.leaves(carry_parallel), jax.tree.leaves(carry_sequential), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rglru_step_is_griffins_recurrent_block():
    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    def gelu(z):  # The tanh approximation, flax.linen.gelu's default.
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    cell, params, (h0, past) = _rglru_start(6, 3, batch=2, input_dim=4)
    x = jax.random.normal(jax.random.key(9), (2, 4))
    (h, conv_inputs), y = cell.apply({"params": params}, (h0, past), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64, h0, past = (np.asarray(a, np.float64) for a in (x, h0, past))

    def dense(v, name):
        return v @ p[name]["kernel"] + p[name]["bias"]

    u = dense(x64, "linear_x")
    window = np.concatenate([past, u[:, None]], axis=1)  # Oldest first, the current u last.
    c = sum(window[:, k] * p["conv_kernel"][k] for k in range(3)) + p["conv_bias"]
    r, i = sigmoid(dense(c, "recurrence_gate")), sigmoid(dense(c, "input_gate"))
    a = sigmoid(p["a_param"]) ** (8 * r)  # Griffin: a_t = sigmoid(Lambda)^(c r_t), c = 8.
    h_want = a * h0 + np.sqrt(1 - a**2) * (i * c)
    y_want = dense(h_want * gelu(dense(x64, "linear_y")), "linear_out")
    np.testing.assert_allclose(h, h_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conv_inputs, window[:, 1:], rtol=1e-6, atol=1e-7)
    # At initialisation sigmoid(Lambda) lies in [0.9, 0.999] (recurrentgemma's ring).
    base = sigmoid(p["a_param"])
    assert np.all((base >= 0.9 - 1e-6) & (base <= 0.999 + 1e-6)) and np.ptp(base) > 0.01
    dense_kernels = sum(np.size(v["kernel"]) for v in p.values() if isinstance(v, dict))
    assert cell.flops_per_step(4) == 2 * dense_kernels  # Every matmul once; the conv is per unit.


def test_rglru_trains_without_a_sequential_loop_and_with_finite_gradients():
    cell, params, carry = _rglru_start(4, 4, batch=2, input_dim=3)
    xs = jnp.ones((2, 64, 3))
    # sigmoid(Lambda) = 1 in float32 makes a_t = 1, where sqrt(1 - a^2) has an infinite slope.
    params = {**params, "a_param": params["a_param"] + 200.0}

    def loss(params):
        _, ys = cell.apply({"params": params}, carry, xs, method="scan")
        return ys.sum()

    primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(jax.grad(loss))(params).eqns}
    assert not primitives & {"scan", "while"}, primitives
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(jax.grad(loss)(params)))


def test_rglru_refuses_weight_drop_for_want_of_recurrent_kernels():
    with pytest.raises(UsageError, match="--cell=rglru has none. Drop --weight_drop."):
        Config.create(cell="rglru", weight_drop=0.3).validate()


# --- mlstm: xLSTM's matrix-memory LSTM (issue 27, item 1) -----------------------------------


def _mlstm_start(forget: str, chunk: int, batch: int = 3, prefix: int = 100):
    """An mLSTM cell (16 wide, 4 heads), its parameters, a carry that `prefix` random inputs
    leave behind (C, n and m all non-zero), and 300 more inputs."""
    from lstm_jax.cells.mlstm import MLSTM

    cell = MLSTM(16, heads=4, chunk=chunk, forget=forget)
    xs = jax.random.normal(jax.random.key(0), (batch, prefix + 300, 8))
    params = cell.init(jax.random.key(4), cell.init_carry(batch), xs[:, 0])["params"]

    def step(carry, x):
        return cell.apply({"params": params}, carry, x)

    carry, _ = jax.lax.scan(step, cell.init_carry(batch), xs[:, :prefix].swapaxes(0, 1))
    return cell, params, carry, xs[:, prefix:], step


@pytest.mark.parametrize("forget", ["sigmoid", "exponential"])
@pytest.mark.parametrize("chunk", [0, 7, 64])  # 0: one parallel pass; 7, 64: chunkwise + rest.
def test_mlstm_parallel_and_chunkwise_forms_equal_the_recurrent_steps_from_a_carried_state(
    forget, chunk
):
    cell, params, carry, xs, step = _mlstm_start(forget, chunk)
    assert all(float(jnp.abs(a).min()) > 0 or a.ndim > 2 for a in carry)  # A real carry.
    assert float(jnp.abs(carry[2]).max()) > 1  # The stabiliser m has moved off zero.
    carry_parallel, ys_parallel = cell.apply({"params": params}, carry, xs, method="scan")
    carry_steps, ys_steps = jax.lax.scan(step, carry, xs.swapaxes(0, 1))
    # Measured, float32, 300 steps from the carry: sigmoid forget gate, max abs difference
    # 2.6e-6 on outputs up to 1.6, 5.7e-6 on C (up to 18), 2.6e-6 on m (up to 4.2); the
    # exponential one lets m grow to 1,805, where a float32 ulp is 1.2e-4: 7.3e-4 on m
    # (4e-7 relative), 3.1e-5 on outputs.
    atol = 1e-5 if forget == "sigmoid" else 1e-4
    np.testing.assert_allclose(ys_parallel, ys_steps.swapaxes(0, 1), rtol=1e-5, atol=atol)
    for a, b in zip(carry_parallel, carry_steps, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)


def test_mlstm_step_is_the_unstabilised_xlstm_recurrence():
    """The step against xLSTM's equations without the stabiliser, in float64: C_t = f C + e^i
    k v^T, n_t = f n + e^i k, h~ = C^T q / max(|n . q|, 1), from the true (unscaled) C = e^m C~."""

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    cell, params, carry, xs, _ = _mlstm_start("sigmoid", 0, batch=2, prefix=5)
    (c, n, m), y = cell.apply({"params": params}, carry, xs[:, 0])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(xs[:, 0], np.float64)
    c0, n0, m0 = (np.asarray(a, np.float64) for a in carry)

    def dense(name):
        return x @ p[name]["kernel"] + p[name]["bias"]

    q, k, v = (dense(f"{name}_proj").reshape(2, 4, 4) for name in "qkv")
    k = k / 2.0  # sqrt(d), d = 16 / 4 heads.
    f, i = sigmoid(dense("forget_gate")), np.exp(dense("input_gate"))
    true_c = f[..., None, None] * (np.exp(m0)[..., None, None] * c0) + i[..., None, None] * (
        k[..., :, None] * v[..., None, :]
    )
    true_n = f[..., None] * (np.exp(m0)[..., None] * n0) + i[..., None] * k
    h = np.einsum("bhk,bhkv->bhv", q, true_c)
    h = h / np.maximum(np.abs(np.sum(true_n * q, -1)), 1.0)[..., None]
    normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    want = sigmoid(dense("output_gate")) * p["norm_scale"] * normed.reshape(2, 16)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    m_want = np.maximum(np.log(f) + m0, np.log(i))  # The stabiliser; C, n scaled by e^-m.
    np.testing.assert_allclose(m, m_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, true_c / np.exp(m_want)[..., None, None], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(n, true_n / np.exp(m_want)[..., None], rtol=1e-4, atol=1e-6)
    kernels = sum(np.size(a) for a in jax.tree.leaves(params) if np.ndim(a) == 2)
    assert cell.flops_per_step(8) == 2 * kernels + 6 * 16 * 4  # Weights, then C's 6 per entry.


def test_mlstm_trains_without_a_sequential_loop_in_its_parallel_form():
    cell, params, carry, xs, _ = _mlstm_start("sigmoid", 0, batch=2, prefix=3)

    def loss(params):
        _, ys = cell.apply({"params": params}, carry, xs[:, :64], method="scan")
        return ys.sum()

    primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(jax.grad(loss))(params).eqns}
    assert not primitives & {"scan", "while"}, primitives
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(jax.grad(loss)(params)))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cell": "mlstm", "hidden": 16, "mlstm_heads": 3}, "--mlstm_heads=3 must divide "
         "--hidden=16 (each head is hidden / heads wide); pick a divisor"),
        ({"mlstm_heads": 2}, "--mlstm_heads acts on --cell=mlstm only; add --cell=mlstm or drop"),
        ({"mlstm_chunk": 8}, "--mlstm_chunk acts on --cell=mlstm only"),
        ({"cell": "gru", "mlstm_forget": "exponential"}, "--mlstm_forget acts on --cell=mlstm"),
        ({"cell": "mlstm", "weight_drop": 0.3}, "--cell=mlstm has none. Drop --weight_drop."),
        ({"cell": "mlstm", "scan": "wavefront"}, "--scan=wavefront needs a step-by-step scan"),
        ({"attention_window": 32}, "--attention_window acts on --cell=attention only; add "
         "--cell=attention or drop --attention_window."),
        ({"cell": "mlstm", "attention_heads": 2}, "--attention_heads acts on --cell=attention"),
        ({"cell": "attention", "hidden": 12, "attention_heads": 5}, "--attention_heads=5 must "
         "divide --hidden=12"),
        ({"cell": "attention", "weight_drop": 0.3}, "--cell=attention has none. Drop "
         "--weight_drop."),
        ({"cell": "attention", "remat": True}, "--remat needs a step-by-step scan"),
    ],
)  # fmt: skip
def test_what_a_new_cell_cannot_take_is_refused_in_one_line(settings, message):
    with pytest.raises(UsageError, match=re.escape(message)) as error:
        Config.create(**settings).validate()
    assert "\n" not in str(error.value)


# --- attention: causal multi-head attention over a sliding window (issue 27, item 3) ----------


def _attention_start(window: int, batch: int = 3, steps: int = 60, features: int = 16):
    from lstm_jax.cells.attention import Attention

    cell = Attention(features, window=window, heads=4)
    xs = jax.random.normal(jax.random.key(0), (batch, steps, 5))
    params = cell.init(jax.random.key(1), cell.init_carry(batch), xs[:, 0])["params"]
    return cell, params, xs


@pytest.mark.parametrize("window, chunk", [(8, 20), (8, 5), (1, 7), (64, 20)])
def test_attention_chunks_with_the_carried_window_equal_one_pass_and_stepping(window, chunk):
    # Chunks longer and shorter than the window; a window of 1 (each position sees itself);
    # one longer than the whole text (every position sees the whole past).
    cell, params, xs = _attention_start(window)
    apply = functools.partial(cell.apply, {"params": params}, method="scan")
    carry_whole, ys_whole = apply(cell.init_carry(3), xs)
    carry, pieces = cell.init_carry(3), []
    for start in range(0, xs.shape[1], chunk):
        carry, ys = apply(carry, xs[:, start : start + chunk])
        pieces.append(ys)
    carry_steps, ys_steps = jax.lax.scan(
        lambda carry, x: cell.apply({"params": params}, carry, x), cell.init_carry(3),
        xs.swapaxes(0, 1),
    )  # fmt: skip
    # Measured: at most 4.8e-7 apart on outputs up to 3.2 (rotary angles of other positions).
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), ys_whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ys_steps.swapaxes(0, 1), ys_whole, rtol=1e-5, atol=1e-5)
    for a, b, c in zip(carry_whole, carry, carry_steps, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
    valid = np.asarray(carry_whole[2])  # The last min(window, 60) positions hold characters.
    assert valid.sum(1).tolist() == [min(window, 60)] * 3


def test_attention_is_softmax_attention_over_the_window_with_rotary_positions():
    """Each output against a float64 reference written out here: explicit 2x2 rotations of
    each feature pair by position x frequency, scores over the last W positions only."""
    window, features, heads, d = 4, 8, 4, 2
    cell, params, xs = _attention_start(window, batch=2, steps=9, features=features)
    _, ys = cell.apply({"params": params}, cell.init_carry(2), xs, method="scan")
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(xs, np.float64)

    def dense(v, name):
        return v @ p[name]["kernel"] + p[name]["bias"]

    def turned(v, position):  # v [..., heads, 2]: the one pair (0, 1) per head, frequency 1.
        angle = position * 1.0
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return v @ rotation.T

    q, k, v = (dense(x, f"{name}_proj").reshape(2, 9, heads, d) for name in "qkv")
    want = np.zeros((2, 9, features))
    for t in range(9):
        seen = range(max(0, t - window + 1), t + 1)
        scores = np.stack([np.sum(turned(q[:, t], t) * turned(k[:, j], j), -1) for j in seen])
        weights = np.exp(scores / np.sqrt(d)) / np.exp(scores / np.sqrt(d)).sum(0)
        heads_out = sum(w[..., None] * v[:, j] for w, j in zip(weights, seen, strict=True))
        want[:, t] = dense(heads_out.reshape(2, features), "out_proj")
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-6)
    kernels = sum(np.size(a) for a in jax.tree.leaves(params) if np.ndim(a) == 2)
    assert cell.flops_per_step(5) == 2 * kernels + (4 + 3) * window * features  # + rotation


@pytest.mark.parametrize("cell", ci_or_slow(["mlstm", "attention"], ["attention"]))
def test_new_cells_export_and_load_give_the_checkpoints_logits(tiny_config, tmp_path, cell):
    # What `python -m lstm_jax.export` writes, read back as LOAD_EXPORT (test_workflows) does.
    import dataclasses

    import lstm_jax
    from lstm_jax import export
    from lstm_jax.api import restore

    config = tiny_config.replace(cell=cell, num_steps=4)
    result = train_and_evaluate(config, devices=jax.local_devices()[:1])
    model, params, vocab, step, _ = restore(config.loop.workdir, "latest", "")
    out = tmp_path / "exported"
    out.mkdir()
    export.write_export(out, params, vocab.chars, dataclasses.asdict(model.config), {})
    loaded = {}
    for name, array in export.safetensors_numpy().load_file(str(out / "model.safetensors")).items():
        *parents, leaf = name.split("/")
        functools.reduce(lambda node, key: node.setdefault(key, {}), parents, loaded)[leaf] = array
    ids = jnp.asarray(vocab.encode("The night was dark. The count")[None])
    net = build_model(config, vocab.size)
    _, want = net.apply({"params": result.params}, net.initialize_carry(1), ids)
    _, got = model.apply({"params": loaded}, model.initialize_carry(1), ids)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Scoring reads the text in chunks of 256 with the carry (the window, the memory) between.
    trained = lstm_jax.load(config.loop.workdir)
    text = Path(config.data.data_path).read_text()[:700]
    ids = vocab.encode(text)
    _, logits = net.apply({"params": result.params}, net.initialize_carry(1), ids[None])
    want = cross_entropy_sum(logits[0, :-1], ids[1:]) / (len(ids) - 1) / np.log(2)
    assert trained.step == step == 4
    np.testing.assert_allclose(trained.score(text), want, rtol=1e-5)
    assert len(trained.generate("The ", length=30, seed=1)) == 30
