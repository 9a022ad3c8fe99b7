"""`python -m lstm_jax.info WORKDIR`: the checkpoints, the model and its size, from metadata."""

import shutil
from pathlib import Path

import jax
import pytest
from subprocesses import run_module

from lstm_jax.checkpoint import Checkpoints
from lstm_jax.config import Config
from lstm_jax.models import build_model, count_params, init_params
from lstm_jax.steps import bits_per_char
from lstm_jax.train import train_and_evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_text):
    """A tiny GRU run with checkpoints at steps 4 and 8: (config, {step: meta}, best step)."""
    tmp = tmp_path_factory.mktemp("info")
    (tmp / "small.txt").write_text(small_text)
    config = Config.create(
        data_path=str(tmp / "small.txt"), workdir=str(tmp / "run"), cell="gru", embed_dim=8,
        hidden=16, num_layers=1, seq_len=16, global_batch=8, num_steps=8, warmup_steps=2,
        learning_rate=1e-2, log_every=4, eval_every=4, checkpoint_every=4, length=5,
    )  # fmt: skip
    result = train_and_evaluate(config, devices=jax.local_devices()[:1], log=lambda m: None)
    checkpoints = Checkpoints(config.loop.workdir, read_only=True)
    metas = {step: checkpoints.read_meta(step) for step in checkpoints.steps()}
    best = checkpoints.best_step()
    checkpoints.close()
    assert sorted(metas) == [4, 8]
    return config, metas, best, result.vocab.size, result.test_loss


def test_info_lists_every_checkpoint_then_the_model_and_its_size(trained):
    config, metas, best, vocab_size, test_loss = trained
    before = sorted(Path(config.loop.workdir).rglob("*"))
    result = run_module("lstm_jax.info", config.loop.workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = {int(line[1:].split()[0]): line for line in lines if line[1:].split()[0].isdigit()}
    assert sorted(rows) == [4, 8]
    for step, line in rows.items():
        marker, _, val_bpc, test_bpc, _ = line[0], *line[1:].split()
        assert marker == ("*" if step == best else " "), line
        assert val_bpc == f"{metas[step]['val_bpc']:.4f}", line
        # The finished run tested its best checkpoint, and only that one.
        assert test_bpc == (f"{bits_per_char(test_loss):.4f}" if step == best else "-"), line
    expected = count_params(init_params(build_model(config, vocab_size), jax.random.key(0)))
    assert f"parameters: {expected:,}" in lines
    assert f"vocabulary: {vocab_size} characters" in lines
    model_line = next(line for line in lines if line.startswith("model: "))
    for flag in ("--cell=gru", "--embed_dim=8", "--hidden=16", "--num_layers=1", "--noresidual"):
        assert flag in model_line.split(), model_line
    assert sorted(Path(config.loop.workdir).rglob("*")) == before  # It only reads.


def test_info_refuses_a_missing_workdir_in_one_line_and_documents_its_argument(tmp_path):
    result = run_module("lstm_jax.info", f"--workdir={tmp_path / 'missing'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "FATAL"))]
    assert lines == [f"error: {tmp_path / 'missing'} does not exist; give a run folder (the "
                     "--workdir of python -m lstm_jax.main)."], result.stderr[-2000:]  # fmt: skip
    assert not (tmp_path / "missing").exists()
    usage = run_module("lstm_jax.info", "--help")
    assert "python -m lstm_jax.info WORKDIR" in usage.stdout and "--workdir:" in usage.stdout


def test_info_skips_damaged_metrics_lines_with_a_warning_and_shows_test_bpc(trained, tmp_path):
    config, _, best, _, test_loss = trained
    workdir = tmp_path / "run"
    shutil.copytree(config.loop.workdir, workdir)
    path = workdir / "metrics.jsonl"
    good = path.read_bytes()
    path.write_bytes(b'[1, 2]\n{"step": 4, "test_bpc": "low"}\n\xff\n' + good + b'{"step": 9, "te')
    result = run_module("lstm_jax.info", str(workdir))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = good.count(b"\n") + 4
    damaged = {1: "not a JSON object", 2: "not a number", 3: "not UTF-8", last: "not JSON"}
    warnings = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == len(damaged)
    for number, why in damaged.items():
        (warning,) = [w for w in warnings if f"{path}:{number}: skipped" in w]
        assert why in warning, warning
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("*")]
    _, step, _, test_bpc, _ = row.split()
    assert (int(step), test_bpc) == (best, f"{bits_per_char(test_loss):.4f}")
