"""Training and evaluation against numbers computed independently of the code under test.

Every expected value here comes from a closed form or from a direct, hand-written computation
(`model.apply`, `jax.grad` and the optimizer's formulas), never from another run of the same
training code, so a bug that two runs share cannot pass.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import stream_loss, warmup_cosine

from lstm_jax import parallel
from lstm_jax.data import Vocab, load_corpus, split
from lstm_jax.generate import generate
from lstm_jax.models import build_model, init_params
from lstm_jax.steps import create_train_state, learning_rate_schedule, train_step
from lstm_jax.train import train_and_evaluate

VOCAB_SIZE = 10


# --- Evaluation ------------------------------------------------------------------------------


def test_validation_loss_equals_a_direct_pass_over_each_stream(tiny_config):
    """The loop's validation loss is the mean over every validation character, each stream read
    in one `model.apply` from a zero state: chunking, the carry between chunks, padding weights
    and the sharding over devices must not change it."""
    config = tiny_config.replace(num_steps=6, dropout=0.0)
    result = train_and_evaluate(config, devices=jax.local_devices()[:2])

    text, _ = load_corpus(config.data)
    vocab = Vocab.from_text(text)
    val_ids = split(vocab.encode(text), config.data.val_fraction, config.data.test_fraction).val
    num_targets = len(val_ids) - 1
    # Streams are whole chunks long, so only the end of the text is padded.
    chunks = math.ceil(math.ceil(num_targets / config.data.global_batch) / config.data.seq_len)
    assert chunks > 1 and num_targets % (chunks * config.data.seq_len)  # Carry and padding matter.
    model = build_model(config, vocab.size)
    want = stream_loss(model, result.params, val_ids, config.data.global_batch, config.data.seq_len)
    np.testing.assert_allclose(result.val_loss, want, rtol=2e-6)


# --- The train step against a hand-written one ------------------------------------------------


def _hand_written_steps(model, params, batches, carry, config, total_steps):
    """Forward, jax.grad, global-norm clipping and Adam(W) written out from the formulas."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    losses = []

    for t, batch in enumerate(batches):
        inputs, targets = batch[:, :-1], batch[:, 1:]

        def loss_fn(params32, carry=carry, inputs=inputs, targets=targets):
            new_carry, logits = model.apply({"params": params32}, carry, inputs)
            log_probs = jax.nn.log_softmax(logits)
            picked = jnp.take_along_axis(log_probs, targets[..., None], -1)
            return -picked.mean(), new_carry

        params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
        (loss, carry), g = jax.value_and_grad(loss_fn, has_aux=True)(params32)
        losses.append(float(loss))
        g = jax.tree.map(lambda x: np.asarray(x, np.float64), g)
        norm = math.sqrt(sum(float((x**2).sum()) for x in jax.tree.leaves(g)))
        if config.optim.grad_clip > 0 and norm > config.optim.grad_clip:
            g = jax.tree.map(lambda x, s=config.optim.grad_clip / norm: x * s, g)
        lr = warmup_cosine(t, config.optim.learning_rate, config.optim.warmup_steps, total_steps)
        wd = config.optim.weight_decay if config.optim.optimizer == "adamw" else 0.0
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_**2, v, g)

        def update(p_, m_, v_, t=t, lr=lr, wd=wd):
            m_hat = m_ / (1 - b1 ** (t + 1))
            v_hat = v_ / (1 - b2 ** (t + 1))
            return p_ - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p_)

        p = jax.tree.map(update, p, m, v)
    return p, losses


@pytest.mark.parametrize(
    "optimizer, weight_decay, grad_clip",
    [
        ("adamw", 0.1, 0.05),  # Clipping binds (gradient norms here are about 0.3-1).
        ("adamw", 0.1, 100.0),  # Clipping on but never binding.
        ("adam", 0.0, 0.0),  # Plain Adam, no clipping.
    ],
)
def test_train_step_equals_a_hand_written_adamw_step(
    tiny_config, optimizer, weight_decay, grad_clip
):
    config = tiny_config.replace(
        dropout=0.0,
        optimizer=optimizer,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        learning_rate=0.01,
        warmup_steps=2,
        schedule="cosine",
    )
    total_steps = 6
    model = build_model(config, VOCAB_SIZE)
    params = init_params(model, jax.random.key(0))
    state = create_train_state(model, params, config.optim, total_steps, jax.random.key(1))
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, VOCAB_SIZE, (4, config.data.seq_len + 1)).astype(np.int32) for _ in range(5)
    ]
    carry = jax.tree.map(
        lambda c: jnp.asarray(rng.normal(size=c.shape), jnp.float32), model.initialize_carry(4)
    )
    expected_params, expected_losses = _hand_written_steps(
        model, params, batches, carry, config, total_steps
    )

    step = jax.jit(train_step)
    got_losses, norms = [], []
    for batch in batches:
        state, carry, metrics = step(state, batch, carry, jnp.asarray(False))
        got_losses.append(float(metrics["loss_sum"] / metrics["count"]))
        norms.append(float(metrics["grad_norm_sum"] / metrics["count"]))
    np.testing.assert_allclose(got_losses, expected_losses, rtol=1e-6)
    if 0 < grad_clip < 1:
        assert min(norms) > grad_clip, "clipping must bind in this case"
    for path, got in jax.tree_util.tree_leaves_with_path(state.params):
        want = expected_params
        for key in path:
            want = want[key.key]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=str(path))
    assert int(state.step) == len(batches)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_matches_its_closed_form(tiny_config, schedule):
    config = tiny_config.replace(learning_rate=3e-3, warmup_steps=10, schedule=schedule)
    total = 110
    lr = learning_rate_schedule(config.optim, total)
    for step in [0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110]:
        if schedule == "cosine":
            want = warmup_cosine(step, 3e-3, 10, total)
        else:
            want = 3e-3 * min(step / 10, 1.0)
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-5, atol=1e-12, err_msg=step)
    if schedule == "cosine":  # The end of the run is 10% of the peak, not 0.
        np.testing.assert_allclose(float(lr(total)), 3e-4, rtol=1e-5)


# --- Carry handling ---------------------------------------------------------------------------


def _state_and_batch(config, seed=0):
    model = build_model(config, VOCAB_SIZE)
    state = create_train_state(
        model,
        init_params(model, jax.random.key(seed)),
        config.replace(warmup_steps=0).optim,
        10,
        jax.random.key(1),
    )
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, VOCAB_SIZE, (4, config.data.seq_len + 1)).astype(np.int32)
    carry = jax.tree.map(
        lambda c: jnp.asarray(rng.normal(size=c.shape), jnp.float32), model.initialize_carry(4)
    )
    zeros = model.initialize_carry(4)
    return state, batch, carry, zeros


def test_reset_zeroes_the_carry_before_the_step(tiny_config):
    state, batch, carry, zeros = _state_and_batch(tiny_config.replace(dropout=0.0))
    step = jax.jit(train_step)
    reset = step(state, batch, carry, jnp.asarray(True))
    from_zero = step(state, batch, zeros, jnp.asarray(False))
    kept = step(state, batch, carry, jnp.asarray(False))
    for a, b in zip(
        jax.tree.leaves((reset[0].params, reset[1:])),
        jax.tree.leaves((from_zero[0].params, from_zero[1:])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert float(kept[2]["loss_sum"]) != float(reset[2]["loss_sum"])


def _record_loop_steps(monkeypatch):
    """Wrap the loop's pmapped step to record each call's reset flag and carry in and out."""
    calls = []
    original = parallel.train_step

    def recording_train_step(devices):
        step = original(devices)

        def wrapped(state, batch, carry, reset):
            state, new_carry, metrics = step(state, batch, carry, reset)
            calls.append(
                {
                    "reset": bool(reset),
                    "carry_in": jax.tree.map(np.asarray, carry),
                    "carry_out": jax.tree.map(np.asarray, new_carry),
                    "batch": np.asarray(batch),
                }
            )
            return state, new_carry, metrics

        return wrapped

    monkeypatch.setattr(parallel, "train_step", recording_train_step)
    return calls


@pytest.mark.parametrize("carry_state", [True, False])
def test_the_loop_resets_the_carry_exactly_at_epoch_starts(tiny_config, monkeypatch, carry_state):
    # Wide batches on the small text give 3 steps per epoch, so 8 steps cross two boundaries.
    config = tiny_config.replace(
        global_batch=64, seq_len=64, num_steps=8, carry_state=carry_state, dropout=0.0
    )
    text, _ = load_corpus(config.data)
    n, data = len(text), config.data
    train_len = n - round(n * data.val_fraction) - round(n * data.test_fraction)
    stream_len = (train_len - config.data.seq_len) // config.data.global_batch
    steps_per_epoch = (stream_len - 1) // config.data.seq_len
    assert steps_per_epoch == 3
    calls = _record_loop_steps(monkeypatch)
    train_and_evaluate(config, devices=jax.local_devices()[:1])
    assert len(calls) == 8
    expected = [k % steps_per_epoch == 0 or not carry_state for k in range(8)]
    assert [c["reset"] for c in calls] == expected
    for k in range(1, 8):
        # The carry handed to step k is what step k-1 left; a reset only happens inside the step.
        for a, b in zip(
            jax.tree.leaves(calls[k]["carry_in"]),
            jax.tree.leaves(calls[k - 1]["carry_out"]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    # With carried state, a row continues the text where the same row of the last step ended.
    if carry_state:
        np.testing.assert_array_equal(calls[2]["batch"][..., 0], calls[1]["batch"][..., -1])


# --- Dropout ----------------------------------------------------------------------------------


def test_dropout_draws_a_new_mask_at_every_step_and_the_same_one_again_for_that_step(
    tiny_config,
):
    state, batch, carry, _ = _state_and_batch(tiny_config.replace(dropout=0.5))
    step = jax.jit(train_step)
    losses = {}
    for k in (3, 4, 5):
        at_k = state.replace(step=jnp.asarray(k, jnp.int32))
        losses[k] = float(step(at_k, batch, carry, jnp.asarray(False))[2]["loss_sum"])
        again = float(step(at_k, batch, carry, jnp.asarray(False))[2]["loss_sum"])
        assert again == losses[k]  # A resumed run at step k must draw the same mask.
    assert len(set(losses.values())) == 3, losses
    # Another seed's key gives other masks at the same step.
    other = state.replace(
        dropout_key=jax.random.key_data(jax.random.key(7)), step=jnp.asarray(3, jnp.int32)
    )
    assert float(step(other, batch, carry, jnp.asarray(False))[2]["loss_sum"]) != losses[3]


# --- Sampling ---------------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)


def _constant_logits_model():
    """A model whose logits are LOGITS whatever it reads: every weight zero but the output bias.

    With zero kernels and biases an LSTM keeps c = 0 and h = 0, so only the output bias is left.
    """
    from lstm_jax.config import Config

    config = Config.create(embed_dim=4, hidden=8, num_layers=2, dropout=0.0)
    model = build_model(config, len(LOGITS))
    params = jax.tree.map(jnp.zeros_like, init_params(model, jax.random.key(0)))
    params["logits"]["bias"] = jnp.asarray(LOGITS)
    return model, params


@pytest.mark.parametrize("temperature, top_k", [(0.5, 0), (1.0, 0), (2.0, 0), (1.0, 3), (2.0, 2)])
def test_sampled_frequencies_follow_the_tempered_softmax(temperature, top_k):
    model, params = _constant_logits_model()
    n = 256
    tokens = generate(
        model,
        params,
        jnp.zeros((n, 2), jnp.int32),
        jax.random.key(0),
        temperature,
        length=100,
        top_k=top_k,
    )
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=len(LOGITS))
    scaled = LOGITS.astype(np.float64) / temperature
    if top_k:
        scaled[np.argsort(-LOGITS)[top_k:]] = -np.inf
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    draws = counts.sum()
    assert draws == n * 100
    # Five standard deviations of a binomial count; zero-probability tokens never appear.
    np.testing.assert_array_less(np.abs(counts - draws * p), 5 * np.sqrt(draws * p * (1 - p)) + 1)


# The nucleus of each case, worked out by hand from LOGITS: the softmax of LOGITS / temperature
# (after top-k) sorted, summed until it reaches top_p. Untempered, T=2 and T=.5 would keep 4.
#   T=1: p = .561 .206 .125 .076 .028 .004; cumulative .561 .767 .892 .968 .996 1.
#   T=2: p = .363 .220 .172 .134 .081 .030; cumulative .363 .584 .755 .889 .970 1.
#   T=1, top 3 renormalised: p = .629 .231 .140; cumulative .629 .860 1.
NUCLEI = [
    (1.0, 0, 0.8, [0, 1, 2]),  # .767 < .8 <= .892
    (1.0, 0, 0.5, [0]),  # The most likely alone already reaches .5.
    (2.0, 0, 0.9, [0, 1, 2, 3, 4]),  # .889 < .9: all but the least likely.
    (1.0, 3, 0.8, [0, 1]),  # Within the top 3: .629 < .8 <= .860 (over all six: 3 kept).
    (0.5, 0, 0.9, [0, 1]),  # T=.5: p = .829 .112 .041 ...; .829 < .9 <= .941.
]


@pytest.mark.parametrize("temperature, top_k, top_p, nucleus", NUCLEI)
def test_top_p_frequencies_follow_the_nucleus_computed_by_hand(temperature, top_k, top_p, nucleus):
    model, params = _constant_logits_model()
    n = 256
    tokens = generate(
        model,
        params,
        jnp.zeros((n, 2), jnp.int32),
        jax.random.key(1),
        temperature,
        length=100,
        top_k=top_k,
        top_p=top_p,
    )
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=len(LOGITS))
    p = np.zeros(len(LOGITS))
    p[nucleus] = np.exp(LOGITS[nucleus].astype(np.float64) / temperature)
    p /= p.sum()  # Renormalised over the nucleus; every other character has probability 0.
    draws = counts.sum()
    np.testing.assert_array_less(np.abs(counts - draws * p), 5 * np.sqrt(draws * p * (1 - p)) + 1)


def test_temperature_zero_always_takes_the_argmax():
    model, params = _constant_logits_model()
    tokens = generate(
        model, params, jnp.zeros((4, 1), jnp.int32), jax.random.key(0), 0.0, length=50
    )
    assert np.all(np.asarray(tokens) == int(np.argmax(LOGITS)))


def test_each_device_draws_its_own_dropout_mask(tiny_config):
    """Two devices given the same rows must not drop the same units, or the data-parallel
    batch would carry one mask twice: its loss would be exactly twice one device's."""
    state, batch, carry, _ = _state_and_batch(tiny_config.replace(dropout=0.5))
    losses = []
    for n in (1, 2):
        devices = jax.local_devices()[:n]
        rows = jax.tree.map(lambda x, n=n: np.stack([np.asarray(x)] * n), (batch, carry))
        step = parallel.train_step(devices)
        _, _, metrics = step(parallel.replicate(state, devices), *rows, False)
        losses.append(float(metrics["loss_sum"]))
    assert losses[1] != 2 * losses[0], losses
