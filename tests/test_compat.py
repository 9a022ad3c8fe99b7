"""Checkpoints written by earlier versions still sample and resume, with the same numbers.

`tests/fixtures/ckpt_v0` was written by the code of commit 06a012c (see the README there); the
expected strings and losses below are what that code printed for it.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from references import stream_loss
from subprocesses import run_module

from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.config import DataConfig
from lstm_jax.data import Vocab, load_corpus, split
from lstm_jax.models import init_params, model_from_settings

FIXTURES = Path(__file__).parent / "fixtures"
CKPT_V0 = FIXTURES / "ckpt_v0"
CORPUS = FIXTURES / "tiny_corpus.txt"


@pytest.mark.parametrize(
    "args, continuation",
    [
        (["--temperature=0"], "he" + " " * 38),
        (["--temperature=1", "--seed=3"], "een  c dh  ttted  n  jc  ree o awe g c n"),
    ],
)
def test_v0_checkpoint_samples_what_it_sampled_when_written(args, continuation):
    result = run_module(
        "lstm_jax.sample", f"--workdir={CKPT_V0}", "--length=40", "--prompt=The count", *args
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"The count{continuation}\n"
    assert result.stderr.startswith("# step 40, validation 3.691 bpc")


def test_v0_checkpoint_validation_loss_equals_a_direct_pass_with_its_parameters():
    checkpoints = Checkpoints(CKPT_V0, read_only=True)
    meta = checkpoints.read_meta(40)
    vocab = Vocab(meta["vocab"])
    model = model_from_settings(meta["settings"], vocab.size)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    params = checkpoints.restore_params(40, abstract_like(abstract))
    text, _ = load_corpus(DataConfig(data_path=str(CORPUS)))
    # Before --test_fraction, validation was the end of the text.
    val_ids = split(vocab.encode(text), meta["settings"]["val_fraction"]).val
    want = stream_loss(model, params, val_ids, num_streams=8, seq_len=16)
    np.testing.assert_allclose(meta["val_loss"], want, rtol=2e-6)


def test_v0_checkpoint_resumes_to_the_loss_that_code_reached(tmp_path):
    workdir = tmp_path / "ckpt_v0"
    shutil.copytree(CKPT_V0, workdir)
    result = run_module(
        "lstm_jax.main",
        f"--flagfile={workdir / 'flags.txt'}",
        f"--workdir={workdir}",
        f"--data_path={CORPUS}",
        "--test_fraction=0",  # Its split: from before the test part, which the resume must keep.
        "--num_steps=44",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from step 40" in result.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in records if r["step"] == 44 and "val_loss" in r]
    # What the code of 06a012c reached on the same resume.
    np.testing.assert_allclose(last["val_loss"], 2.5491723841077754, rtol=1e-6)
