"""The command line, end to end in real subprocesses: train, resume, sample, and bad input."""

import functools
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from subprocesses import run_module as _run

from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.data import Vocab
from lstm_jax.generate import sample_text
from lstm_jax.models import init_params, model_from_settings


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory, dracula_path):
    """`main` with experiments/smoke.flags on Dracula; shared by the tests that read its output."""
    workdir = tmp_path_factory.mktemp("smoke")
    result = _run(
        "lstm_jax.main",
        "--flagfile=experiments/smoke.flags",
        f"--data_path={dracula_path}",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_main_trains_checkpoints_and_samples(smoke_workdir):
    workdir, result = smoke_workdir
    assert "Traceback" not in result.stderr
    assert "step 300/300" in result.stderr and "chars/s" in result.stderr
    assert "Finished 300 steps; sample:" in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "150",
        "300",
    ]
    flags = (workdir / "flags.txt").read_text()
    assert "--hidden=128" in flags and f"--workdir={workdir}" in flags
    assert "--top_k" not in flags  # Sampling-only flags would make main refuse its own flagfile.
    metrics = (workdir / "metrics.jsonl").read_text().splitlines()
    assert any('"val_bpc"' in line for line in metrics)


def _restore_for_sampling(workdir: Path, step: int):
    """The model, parameters and vocabulary of a checkpoint, restored in this process."""
    checkpoints = Checkpoints(workdir, read_only=True)
    meta = checkpoints.read_meta(step)
    vocab = Vocab(meta["vocab"])
    model = model_from_settings(meta["settings"], vocab.size)
    abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return model, checkpoints.restore_params(step, abstract_like(abstract, sharding)), vocab, meta


def _greedy_by_hand(model, params, vocab: Vocab, prompt: str, length: int) -> str:
    """The argmax continuation, one `model.apply` per character."""
    apply = jax.jit(model.apply)
    carry, logits = apply(
        {"params": params}, model.initialize_carry(1), jnp.asarray(vocab.encode(prompt)[None])
    )
    out = []
    for _ in range(length):
        token = jnp.argmax(logits[:, -1], -1)
        out.append(int(token[0]))
        carry, logits = apply({"params": params}, carry, token[:, None])
    return vocab.decode(out)


def test_sample_command_prints_the_best_checkpoints_own_continuation(smoke_workdir):
    workdir, _ = smoke_workdir
    checkpoints = Checkpoints(workdir, read_only=True)
    best = min(checkpoints.steps(), key=lambda step: checkpoints.read_meta(step)["val_loss"])
    model, params, vocab, meta = _restore_for_sampling(workdir, best)
    args = [f"--workdir={workdir}", "--prompt=Jonathan", "--length=120", "--num_samples=2"]
    # Greedy: both samples are the argmax continuation of the best checkpoint's parameters.
    greedy = _run("lstm_jax.sample", *args, "--temperature=0")
    assert greedy.returncode == 0, greedy.stderr
    expected = "Jonathan" + _greedy_by_hand(model, params, vocab, "Jonathan", 120)
    assert greedy.stdout == f"--- sample 1 ---\n{expected}\n--- sample 2 ---\n{expected}\n"
    assert f"# step {best}, validation {meta['val_bpc']:.3f} bpc" in greedy.stderr
    # Sampled (default temperature 0.8) with --seed: what sample_text draws here from the same
    # parameters and seed, so the flags reach the sampler and a seed repeats the text.
    sampled = _run("lstm_jax.sample", *args, "--seed=7")
    assert sampled.returncode == 0, sampled.stderr
    texts = sample_text(
        model, params, vocab, "Jonathan", length=120, temperature=0.8, num_samples=2, seed=7
    )
    assert texts[0] != texts[1]
    assert sampled.stdout == "".join(
        f"--- sample {i + 1} ---\nJonathan{text}\n" for i, text in enumerate(texts)
    )


def test_running_the_same_command_again_resumes(smoke_workdir, dracula_path):
    workdir, _ = smoke_workdir
    result = _run(
        "lstm_jax.main",
        "--flagfile=experiments/smoke.flags",
        f"--data_path={dracula_path}",
        f"--workdir={workdir}",
        "--num_steps=350",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from step 300" in result.stderr
    assert "step 350/350" in result.stderr


def _tiny_training_args(text_path: Path, workdir: Path, **overrides) -> list[str]:
    """`main` on a model small enough that a step takes milliseconds; quiet, no periodic saves."""
    flags = {
        "data_path": text_path,
        "workdir": workdir,
        "embed_dim": 8,
        "hidden": 16,
        "seq_len": 16,
        "global_batch": 8,
        "log_every": 1000,
        "eval_every": 1000,
        "checkpoint_every": 1000,
        "length": 10,
        **overrides,
    }
    return ["lstm_jax.main", *(f"--{k}={v}" for k, v in flags.items())]


def test_sample_every_logs_a_sample_at_each_multiple_below_the_last_step(small_text_path, tmp_path):
    args = _tiny_training_args(
        small_text_path, tmp_path / "run", num_steps=12, sample_every=3, prompt="The"
    )
    result = _run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    # 3, 6 and 9; not 12, the last step, whose sample is the final one.
    assert re.findall(r"sample at step (\d+)", result.stderr) == ["3", "6", "9"]
    assert re.findall(r"sample at step (\d+):\nThe\|", result.stderr) == ["3", "6", "9"]
    assert "Finished 12 steps; sample:\nThe|" in result.stderr


def test_num_epochs_trains_the_ceiling_of_epochs_times_steps_per_epoch(
    small_text, small_text_path, tmp_path
):
    # The batching's closed form, from the text alone: test is the last 10% and validation
    # the 5% before it (each rounded), the rest is cut into 8 streams leaving room for a
    # 16-character offset, and each step reads 16 characters (+1 target) of every stream.
    seq_len, global_batch, epochs = 16, 8, 1.33
    n = len(small_text)
    train_len = n - round(n * 0.1) - round(n * 0.05)
    stream_len = (train_len - seq_len) // global_batch
    steps_per_epoch = (stream_len - 1) // seq_len
    expected = math.ceil(epochs * steps_per_epoch)
    assert expected != int(epochs * steps_per_epoch)  # So rounding down would be caught.
    args = _tiny_training_args(
        small_text_path, tmp_path / "run", num_steps=0, num_epochs=epochs, warmup_steps=2
    )
    result = _run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{steps_per_epoch} steps per epoch" in result.stderr
    assert f"step {expected}/{expected} |" in result.stderr
    assert f"Finished {expected} steps" in result.stderr
    assert Checkpoints(tmp_path / "run", read_only=True).steps() == [expected]


def test_bad_sampling_input_gives_one_clear_line_and_keeps_checkpoints(smoke_workdir, tmp_path):
    workdir, _ = smoke_workdir
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    cases = [
        ([f"--workdir={tmp_path}/empty"], 1, "No checkpoint"),
        ([f"--workdir={workdir}", "--checkpoint=12345"], 1, "--checkpoint=12345"),
        ([f"--workdir={workdir}", "--prompt=Zoë ☃"], 1, "--unknown=skip"),
        ([f"--workdir={workdir}", "--length=0"], 2, "--length"),
        ([f"--workdir={workdir}", "--temperature=-1"], 2, "--temperature"),
        # NaN compares false with 0, so it was greedy sampling; -1 samples was a traceback.
        ([f"--workdir={workdir}", "--temperature=nan"], 2, "--temperature must be a finite"),
        ([f"--workdir={workdir}", "--num_samples=-1"], 2, "--num_samples must be > 0, got -1."),
        ([f"--workdir={workdir}", "--seed=-1"], 2, "--seed must be in [0, 4294967295], got -1."),
        ([f"--workdir={workdir}", "--top_k=1000"], 2, "--top_k"),
        # The model comes from the checkpoint: sample has no model or training flags.
        ([f"--workdir={workdir}", "--hidden=512"], 1, "Unknown command line flag 'hidden'"),
        ([f"--workdir={workdir}", "--learning_rate=1"], 1, "flag 'learning_rate'"),
    ]
    for args, code, phrase in cases:
        result = _run("lstm_jax.sample", *args)
        assert result.returncode == code, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "FATAL"))]
        assert len(lines) == 1 and phrase in lines[0], (args, result.stderr[-2000:])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert not (tmp_path / "empty").exists()
    skipped = _run("lstm_jax.sample", f"--workdir={workdir}", "--prompt=Zoë ☃", "--unknown=skip")
    assert skipped.returncode == 0 and skipped.stdout.strip()
    # A training flagfile holds flags sample does not read: refused, not silently ignored.
    reused = _run("lstm_jax.sample", "--flagfile=experiments/smoke.flags", f"--workdir={workdir}")
    assert reused.returncode == 1 and "Unknown command line flag" in reused.stderr
