"""Fine-tuning (--init_from, --extend_vocab): a new run that starts from another run's
parameters, with a fresh optimizer; new characters refused or added as new rows."""

import functools

import jax
import numpy as np
import pytest
from subprocesses import run_module

from lstm_jax import finetune
from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.config import Config
from lstm_jax.data import Vocab
from lstm_jax.generate import sample_text
from lstm_jax.models import init_params, model_from_settings
from lstm_jax.steps import init_state
from lstm_jax.train import train_and_evaluate

DEVICES = jax.local_devices()[:1]
TINY = dict(
    embed_dim=16, hidden=64, num_layers=1, seq_len=32, global_batch=16, warmup_steps=5,
    learning_rate=1e-2, dropout=0.0, log_every=10, eval_every=1000, checkpoint_every=1000,
    length=5,
)  # fmt: skip
NEW_CHARACTERS = "Zoë: 42 ☃!\n"


def _quiet(message: str) -> None:
    """The runs' log, unprinted."""


def _train(log=_quiet, **settings):
    return train_and_evaluate(Config.create(**{**TINY, **settings}), devices=DEVICES, log=log)


def _params(workdir, step=None):
    """(parameters on the host, metadata) of a checkpoint, restored independently of finetune."""
    checkpoints = Checkpoints(workdir, read_only=True)
    step = step or checkpoints.latest_step()
    meta = checkpoints.read_meta(step)
    model = model_from_settings(meta["settings"], len(meta["vocab"]))
    abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = checkpoints.restore_params(step, abstract_like(abstract, sharding))
    checkpoints.close()
    return jax.device_get(params), meta


@pytest.fixture(scope="module")
def source(tmp_path_factory, small_text):
    """A run trained 30 steps on the small text: (its workdir, the text's path)."""
    tmp = tmp_path_factory.mktemp("source")
    (tmp / "small.txt").write_text(small_text)
    _train(data_path=str(tmp / "small.txt"), workdir=str(tmp / "run"), num_steps=30)
    return tmp / "run", tmp / "small.txt"


def test_fine_tuning_learns_a_new_text_faster_than_training_from_scratch(
    tmp_path, dracula_path, small_text_path, fast_compile
):
    pretrained = _train(
        data_path=str(dracula_path), workdir=str(tmp_path / "dracula"), num_steps=200
    )
    runs = {}
    for name, start in (("scratch", {}), ("fine-tuned", {"init_from": str(tmp_path / "dracula")})):
        logged = []
        runs[name] = _train(
            logged.append,
            data_path=str(small_text_path), workdir=str(tmp_path / name), num_steps=20, **start,
        )  # fmt: skip
    # Measured on the small text's validation part after 20 steps: from scratch 2.777 nats/char
    # (4.006 bpc); fine-tuned from 200 steps on Dracula 1.734 nats/char (2.502 bpc).
    assert runs["fine-tuned"].val_loss < runs["scratch"].val_loss - 0.5
    assert any(m.startswith("Fine-tuning from") for m in logged)
    # It keeps Dracula's vocabulary (the small text has no other character), so ids keep their
    # meaning, and starts a new run: step 20, not 220, from a fresh warm-up.
    assert runs["fine-tuned"].vocab == pretrained.vocab != runs["scratch"].vocab
    assert runs["fine-tuned"].step == 20


def test_extend_vocab_keeps_every_learnt_parameter_and_adds_new_rows(
    source, tmp_path, fast_compile
):
    workdir, text_path = source
    learnt, meta = _params(workdir)
    old = meta["vocab"]
    new_text = text_path.read_text() + NEW_CHARACTERS * 40
    (tmp_path / "new.txt").write_text(new_text)
    config = Config.create(
        **TINY, data_path=str(tmp_path / "new.txt"), workdir=str(tmp_path / "tuned"),
        init_from=f"{workdir}:latest", extend_vocab=True, num_steps=4,
    )  # fmt: skip
    vocab = finetune.vocab_builder(config)(new_text)
    added = sorted(set(NEW_CHARACTERS) - set(old))
    assert vocab.chars == old + "".join(added) and len(added) >= 6
    model, state = finetune.init_state(config, vocab, 4, _quiet)
    params = jax.device_get(state.params)
    _, fresh = init_state(config, vocab.size, 4)  # The bigger model, initialised from the seed.
    fresh = jax.device_get(fresh.params)
    table, logits = params["embed"]["embedding"], params["logits"]
    kernel, bias = logits["kernel"], logits["bias"]
    assert table.shape[0] == kernel.shape[1] == bias.shape[0] == vocab.size
    np.testing.assert_array_equal(table[: len(old)], learnt["embed"]["embedding"])
    np.testing.assert_array_equal(kernel[:, : len(old)], learnt["logits"]["kernel"])
    np.testing.assert_array_equal(bias[: len(old)], learnt["logits"]["bias"])
    np.testing.assert_array_equal(table[len(old) :], fresh["embed"]["embedding"][len(old) :])
    np.testing.assert_array_equal(kernel[:, len(old) :], fresh["logits"]["kernel"][:, len(old) :])
    for path, leaf in jax.tree_util.tree_leaves_with_path(learnt):
        if path[0].key not in ("embed", "logits"):  # The recurrent layers: all kept as learnt.
            np.testing.assert_array_equal(_at(params, path), leaf)
    # What it learnt still holds: on old characters its old outputs are unchanged.
    old_model = model_from_settings(meta["settings"], len(old))
    ids = Vocab(old).encode("The count said that the night was dark.")[None]
    _, before = old_model.apply({"params": learnt}, old_model.initialize_carry(1), ids)
    _, after = model.apply({"params": params}, model.initialize_carry(1), ids)
    np.testing.assert_allclose(after[..., : len(old)], before, rtol=1e-5, atol=1e-6)
    # A new run: step 0, and an optimizer state as fresh as a new run's (zero moments, count 0).
    assert int(state.step) == 0
    assert not any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(state.opt_state))

    # The run saves that vocabulary, samples with it, and resumes without the source run.
    result = train_and_evaluate(config, devices=DEVICES, log=_quiet)
    _, saved = _params(tmp_path / "tuned")
    assert saved["vocab"] == vocab.chars == result.vocab.chars
    (text,) = sample_text(model, result.params, result.vocab, "Zoë ☃", length=10, temperature=1.0)
    assert len(text) == 10 and set(text) <= set(vocab.chars)
    workdir.rename(workdir.with_name("gone"))
    try:
        logged = []
        resumed = train_and_evaluate(
            config.replace(num_steps=6), devices=DEVICES, log=logged.append
        )
    finally:
        workdir.with_name("gone").rename(workdir)
    assert resumed.step == 6 and resumed.vocab == vocab
    assert any(m.startswith("Resuming from step 4") for m in logged)
    assert not any(m.startswith("Fine-tuning") for m in logged)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_the_command_line_takes_the_model_from_the_checkpoint(source, tmp_path):
    workdir, text_path = source
    result = run_module(
        "lstm_jax.main", f"--init_from={workdir}", f"--data_path={text_path}",
        f"--workdir={tmp_path / 'tuned'}", "--num_steps=2", "--seq_len=32", "--global_batch=16",
        "--length=5", "--dropout=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Fine-tuning from" in result.stderr
    # flags.txt reproduces the run: the checkpoint's model settings, not the defaults.
    flags = (tmp_path / "tuned" / "flags.txt").read_text().splitlines()
    assert "--hidden=64" in flags and "--embed_dim=16" in flags and "--num_layers=1" in flags
    assert f"--init_from={workdir}" in flags


def test_refused_starts_give_one_line_and_write_nothing(source, tmp_path):
    workdir, text_path = source
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.txt").write_text(text_path.read_text() + NEW_CHARACTERS)
    added = sorted(set(NEW_CHARACTERS) - set(text_path.read_text()))
    named = f"has {len(added)} character(s) that the checkpoint's vocabulary of "
    cases = [
        ([f"--init_from={tmp_path / 'missing'}"], 1, "does not exist"),
        ([f"--init_from={tmp_path / 'empty'}"], 1, "no checkpoint in"),
        ([f"--init_from={workdir}:12345"], 1, "there is no step 12345; use best, latest or one"),
        ([f"--init_from={workdir}", f"--data_path={tmp_path / 'other.txt'}"], 1, named),
        ([f"--init_from={workdir}", "--hidden=32"], 2, "--hidden=32 (the checkpoint has 64)"),
        (["--extend_vocab"], 2, "--extend_vocab extends a checkpoint's vocabulary"),
    ]
    for i, (args, code, phrase) in enumerate(cases):
        if not any(a.startswith("--data_path") for a in args):
            args = [*args, f"--data_path={text_path}"]
        args = [*args, "--num_steps=1"]  # Short, should a refusal ever let it train.
        result = run_module("lstm_jax.main", f"--workdir={tmp_path / f'new{i}'}", *args)
        assert result.returncode == code, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "FATAL"))]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr[-2000:])
        assert phrase in lines[0], (args, lines[0])
        assert not (tmp_path / f"new{i}").exists(), args
        if phrase == named:  # Which characters, and the fix.
            assert " ".join(map(repr, added)) + "; pass --extend_vocab" in lines[0], lines[0]
