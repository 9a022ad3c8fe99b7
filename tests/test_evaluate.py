"""The train / validation / test split, the end-of-run test, `python -m lstm_jax.evaluate`, and
which parameters (raw or averaged) a checkpoint's model is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from references import stream_loss
from subprocesses import run_module

from lstm_jax.api import restore
from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.data import Vocab, load_split, split, split_documents
from lstm_jax.models import init_params, model_from_settings
from lstm_jax.steps import bits_per_char
from lstm_jax.train import train_and_evaluate


def test_the_split_is_train_then_validation_then_test_by_position():
    parts = split(np.arange(1000), val_fraction=0.05, test_fraction=0.1)
    np.testing.assert_array_equal(parts.train, np.arange(850))
    np.testing.assert_array_equal(parts.val, np.arange(850, 900))
    np.testing.assert_array_equal(parts.test, np.arange(900, 1000))
    # Without a test part, validation is the end, as before --test_fraction.
    assert split(np.arange(1000), 0.1).val.tolist() == list(range(900, 1000))
    # Every document gives its own shares, joined with the separator.
    joined = split_documents([np.arange(100), np.arange(100, 140)], 0.1, 0.25, np.array([-1]))
    assert joined.test.tolist() == [*range(75, 100), -1, *range(130, 140)]
    assert joined.val.tolist() == [*range(65, 75), -1, *range(126, 130)]
    assert joined.train.tolist() == [*range(65), -1, *range(100, 126)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_text):
    """A tiny run with a parameter average, evaluated and saved at steps 6, 12 and 18."""
    from lstm_jax.config import Config

    folder = tmp_path_factory.mktemp("evaluate")
    text_path = folder / "text.txt"
    text_path.write_text(small_text)
    config = Config.create(
        data_path=str(text_path), workdir=str(folder / "run"), embed_dim=8, hidden=16,
        num_layers=1, seq_len=16, global_batch=8, num_steps=18, warmup_steps=2,
        log_every=6, eval_every=6, checkpoint_every=6, keep_checkpoints=5, ema_decay=0.7,
        dropout=0.0,
        # A learning rate high enough for the raw parameters to jump about, so that their
        # average is the better model (measured: at every checkpoint).
        learning_rate=0.3, schedule="constant", grad_clip=1.0,
    )  # fmt: skip
    result = train_and_evaluate(config, devices=jax.local_devices()[:2])
    return config, result


def _checkpoint_model(workdir, step, which):
    checkpoints = Checkpoints(workdir, read_only=True)
    meta = checkpoints.read_meta(step)
    model = model_from_settings(meta["settings"], len(meta["vocab"]))
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = checkpoints.restore_params(step, abstract_like(abstract, local), which)
    checkpoints.close()
    return model, params, meta


def test_each_checkpoint_is_the_better_of_its_parameters_and_their_average(trained):
    config, result = trained
    workdir = config.loop.workdir
    checkpoints = Checkpoints(workdir, read_only=True)
    steps, best = checkpoints.steps(), checkpoints.best_step()
    checkpoints.close()
    assert steps == [6, 12, 18]
    _, val_ids, _ = _split(config)
    selected_losses = {}
    for step in steps:
        model, raw, meta = _checkpoint_model(workdir, step, "params")
        _, ema, _ = _checkpoint_model(workdir, step, "ema_params")
        raw_loss = stream_loss(model, raw, val_ids, num_streams=8, seq_len=16)
        ema_loss = stream_loss(model, ema, val_ids, num_streams=8, seq_len=16)
        np.testing.assert_allclose([meta["val_loss"], meta["ema_val_loss"]], [raw_loss, ema_loss],
                                   rtol=2e-5)  # fmt: skip
        assert meta["selected"] == ("ema_params" if ema_loss < raw_loss else "params")
        selected_losses[step] = min(raw_loss, ema_loss)
        # What every reader of the checkpoint (sample, export, lstm_jax.load) takes as its model.
        _, restored, _, _, _ = restore(workdir, str(step))
        chosen = ema if meta["selected"] == "ema_params" else raw
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(chosen), strict=True):
            np.testing.assert_array_equal(a, b)
    assert best == min(selected_losses, key=selected_losses.get)
    # The average was chosen somewhere, so readers were checked on it.
    assert "ema_params" in {_meta(workdir, step)["selected"] for step in steps}
    # The average differs from the parameters (it is not a copy).
    _, raw, _ = _checkpoint_model(workdir, 18, "params")
    _, ema, _ = _checkpoint_model(workdir, 18, "ema_params")
    assert not np.allclose(jax.tree.leaves(raw)[0], jax.tree.leaves(ema)[0])


def _meta(workdir, step):
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        return checkpoints.read_meta(step)
    finally:
        checkpoints.close()


def _split(config):
    vocab, parts, _ = load_split(config.data)
    return parts.train, parts.val, parts.test


def test_the_run_ends_with_the_test_loss_of_the_best_checkpoint_read_as_one_stream(trained):
    config, result = trained
    workdir = config.loop.workdir
    _, _, test_ids = _split(config)
    best = Checkpoints(workdir, read_only=True).best_step()
    meta = _meta(workdir, best)
    model, params, _ = _checkpoint_model(workdir, best, meta["selected"])
    want = stream_loss(model, params, test_ids, num_streams=1, seq_len=len(test_ids))
    np.testing.assert_allclose(result.test_loss, want, rtol=2e-6)
    records = [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]
    (test_record,) = [r for r in records if "test_loss" in r]
    assert test_record["step"] == best and test_record["test_of"] == meta["selected"]
    np.testing.assert_allclose(test_record["test_bpc"], bits_per_char(want), rtol=2e-6)


def _last_line(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def _parse(line: str) -> tuple[str, float, float, int]:
    found = re.fullmatch(
        r"(.+): (\S+) bpc \((\S+) nats/char, ([\d,]+) predicted characters: all but the first\)",
        line,
    )
    assert found, line
    name, bpc, nats, count = found.groups()
    return name, float(bpc), float(nats), int(count.replace(",", ""))


def test_the_end_of_a_run_and_evaluate_count_the_same_predicted_characters(
    small_text_path, tmp_path
):
    workdir = tmp_path / "run"
    flags = ["--embed_dim=8", "--hidden=16", "--num_layers=1", "--seq_len=16"]
    flags += ["--global_batch=8", "--num_steps=4", "--warmup_steps=1", "--length=10"]
    trained = run_module(
        "lstm_jax.main", f"--data_path={small_text_path}", f"--workdir={workdir}", *flags
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    (test_line,) = [line for line in trained.stderr.splitlines() if "] Test: " in line]
    end_count = int(
        re.search(r"over the ([\d,]+) predicted test characters", test_line)[1].replace(",", "")
    )
    name, _, _, count = _parse(_last_line(run_module("lstm_jax.evaluate", f"--workdir={workdir}")))
    text = small_text_path.read_text()
    test_part = len(text) - int(len(text) * 0.9)  # The last --test_fraction=0.1 of the text.
    assert name == "test" and end_count == count
    assert abs(count - (test_part - 1)) <= 1  # Every test character but the first.


def test_evaluate_scores_a_split_and_a_text_file(trained, tmp_path):
    config, result = trained
    workdir = config.loop.workdir
    _, val_ids, test_ids = _split(config)
    best = Checkpoints(workdir, read_only=True).best_step()
    model, params, _ = _checkpoint_model(workdir, best, _meta(workdir, best)["selected"])

    line = _last_line(run_module("lstm_jax.evaluate", f"--workdir={workdir}"))
    name, bpc, nats, count = _parse(line)
    assert (name, count) == ("test", len(test_ids) - 1)
    assert abs(bpc - bits_per_char(result.test_loss)) < 6e-5
    assert abs(nats - result.test_loss) < 6e-5

    # Validation in 4 streams, dynamic evaluation with nothing to learn: the static loss.
    line = _last_line(run_module(
        "lstm_jax.evaluate", f"--workdir={workdir}", "--split=val", "--streams=4", "--dynamic",
        "--dynamic_lr=0", "--dynamic_decay=0", "--dynamic_stat_batches=2",
    ))  # fmt: skip
    name, bpc, _, count = _parse(line)
    assert (name, count) == ("val (dynamic evaluation)", len(val_ids) - 1)
    want = stream_loss(model, params, val_ids, num_streams=4, seq_len=50)
    assert abs(bpc - bits_per_char(want)) < 6e-5, (bpc, bits_per_char(want))

    # A text with characters the model never saw: refused, naming them; or scored without them.
    vocab = Vocab(_meta(workdir, best)["vocab"])
    known = vocab.decode(test_ids[:300])
    strange = tmp_path / "strange.txt"
    strange.write_text(known[:100] + "\u2603\u2603" + known[100:] + "\u00a7", encoding="utf-8")
    refused = run_module("lstm_jax.evaluate", f"--workdir={workdir}", f"--text={strange}")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    (error,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "3 character(s) outside the model's vocabulary" in error and "--unknown=skip" in error
    assert "'\u2603'" in error and "'\u00a7'" in error
    skipped = run_module(
        "lstm_jax.evaluate", f"--workdir={workdir}", f"--text={strange}", "--unknown=skip"
    )
    name, bpc, _, count = _parse(_last_line(skipped))
    assert "skipped 3 character(s)" in skipped.stderr
    assert (name, count) == (str(strange), 299)
    want = stream_loss(model, params, vocab.encode(known), num_streams=1, seq_len=300)
    assert abs(bpc - bits_per_char(want)) < 6e-5


def test_evaluate_refuses_two_texts(trained):
    config, _ = trained
    both = run_module(
        "lstm_jax.evaluate", f"--workdir={config.loop.workdir}", "--split=val", "--text=x.txt"
    )
    assert both.returncode == 2 and both.stderr.strip().splitlines()[-1].startswith("error:")
    assert "pass only one" in both.stderr and "Traceback" not in both.stderr


BAD_EVALUATE = [
    # (name, args, the one error line's phrase): each refused before the checkpoint is read.
    ("no streams", ["--streams=0"], "--streams must be > 0, got 0."),
    ("dynamic_lr nan", ["--dynamic", "--dynamic_lr=nan"], "--dynamic_lr must be a finite number"),
    ("dynamic_decay -1", ["--dynamic", "--dynamic_decay=-1"], "--dynamic_decay must be >= 0"),
    ("dynamic_epsilon inf", ["--dynamic", "--dynamic_epsilon=inf"], "--dynamic_epsilon must be a"),
    ("dynamic_segment 0", ["--dynamic", "--dynamic_segment=0"], "--dynamic_segment must be > 0"),
    ("no stat batches", ["--dynamic", "--dynamic_stat_batches=0"], "--dynamic_stat_batches must"),
]


@pytest.mark.parametrize("name, args, phrase", BAD_EVALUATE, ids=[b[0] for b in BAD_EVALUATE])
def test_evaluate_refuses_numbers_out_of_range_in_one_line(trained, name, args, phrase):
    config, _ = trained
    result = run_module("lstm_jax.evaluate", f"--workdir={config.loop.workdir}", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "FATAL"))]
    assert len(lines) == 1 and phrase in lines[0], result.stderr[-2000:]


def test_every_scored_model_says_which_of_its_parameter_sets_was_read(trained):
    # The fixture's best checkpoint kept its EMA (the better of the two on validation): the note
    # of a single model and of each ensemble member names it, so two runs' numbers compare.
    config, _ = trained
    workdir = config.loop.workdir
    best = Checkpoints(workdir, read_only=True).best_step()
    assert _meta(workdir, best)["selected"] == "ema_params"
    single, ensemble = (f"--workdir={workdir}",), (f"--ensemble={workdir},{workdir}", "--cache")
    for args, models in ((single, 1), (ensemble, 2)):
        result = run_module("lstm_jax.evaluate", *args)
        assert result.returncode == 0, result.stderr[-2000:]
        lines = (result.stdout + result.stderr).splitlines()
        (note,) = [line for line in lines if line.startswith("# checkpoint")]
        assert note.count(f"{best} (EMA parameters") == models, note
