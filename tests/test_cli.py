"""The command line, end to end in real subprocesses: train, resume, sample, and bad input."""

from pathlib import Path

import pytest
from subprocesses import run_module as _run


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


def test_sample_command_prints_text_from_the_checkpoint(smoke_workdir):
    workdir, _ = smoke_workdir
    args = [f"--workdir={workdir}", "--prompt=Jonathan", "--length=120", "--num_samples=2"]
    result = _run("lstm_jax.sample", *args, "--seed=7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Jonathan") >= 2 and "--- sample 2 ---" in result.stdout
    assert "validation" in result.stderr and "bpc" in result.stderr
    again = _run("lstm_jax.sample", *args, "--seed=7")
    assert again.stdout == result.stdout


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


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


BAD_INPUTS = [
    # (name, args (with {tmp} and {text}), exit code, a phrase the error line must contain)
    ("missing file", ["--data_path={tmp}/nope.txt"], 1, "does not exist"),
    ("directory", ["--data_path={tmp}"], 1, "is a directory"),
    ("empty file", ["--data_path={empty}"], 1, "is empty"),
    ("not utf-8", ["--data_path={latin1}"], 1, "--encoding"),
    ("text too short", ["--data_path={short}"], 1, "too short"),
    ("dropout 1.5", ["--dropout=1.5"], 2, "--dropout"),
    ("zero batch", ["--global_batch=0"], 2, "--global_batch"),
    ("val_fraction 0", ["--val_fraction=0"], 2, "--val_fraction"),
    ("unknown schedule", ["--schedule=linear"], 2, "--schedule"),
    ("seq_len > validation", ["--seq_len=2000", "--global_batch=1"], 2, "--seq_len"),
    ("sampling-only flag", ["--top_k=5"], 2, "lstm_jax.sample"),
    ("stray argument", ["hidden=5"], 2, "Unexpected arguments"),
]


@pytest.mark.parametrize("name, args, code, phrase", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_training_input_gives_one_clear_line(
    tmp_path, small_text_path, name, args, code, phrase
):
    files = {
        "tmp": str(tmp_path),
        "text": str(small_text_path),
        "empty": _write(tmp_path / "empty.txt", b"  \n"),
        "latin1": _write(tmp_path / "latin1.txt", "Caf\u00e9 au lait. ".encode("latin-1") * 100),
        "short": _write(tmp_path / "short.txt", b"Too short for a batch.\n" * 5),
    }
    args = [a.format(**files) for a in args]
    if not any(a.startswith("--data_path") for a in args):
        args.append(f"--data_path={small_text_path}")
    result = _run("lstm_jax.main", f"--workdir={tmp_path}/run", "--num_steps=2", *args)
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [
        line for line in result.stderr.splitlines() if line.startswith(("error", "FATAL"))
    ]
    assert len(error_lines) == 1 and phrase in error_lines[0], result.stderr[-2000:]


def test_bad_sampling_input_gives_one_clear_line_and_keeps_checkpoints(smoke_workdir, tmp_path):
    workdir, _ = smoke_workdir
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    cases = [
        ([f"--workdir={tmp_path}/empty"], 1, "No checkpoint"),
        ([f"--workdir={workdir}", "--checkpoint=12345"], 1, "--checkpoint=12345"),
        ([f"--workdir={workdir}", "--prompt=Zoë ☃"], 1, "--unknown=skip"),
        ([f"--workdir={workdir}", "--length=0"], 2, "--length"),
        ([f"--workdir={workdir}", "--temperature=-1"], 2, "--temperature"),
        ([f"--workdir={workdir}", "--top_k=1000"], 2, "--top_k"),
        ([f"--workdir={workdir}", "--hidden=512"], 2, "--hidden=512 (the checkpoint has 128)"),
        ([f"--workdir={workdir}", "--dtype=bfloat16"], 2, "sampling computes in float32"),
    ]
    for args, code, phrase in cases:
        result = _run("lstm_jax.sample", *args)
        assert result.returncode == code, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert len(lines) == 1 and phrase in lines[0], (args, result.stderr[-2000:])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert not (tmp_path / "empty").exists()
    skipped = _run("lstm_jax.sample", f"--workdir={workdir}", "--prompt=Zoë ☃", "--unknown=skip")
    assert skipped.returncode == 0 and skipped.stdout.strip()
    # The run's own flagfile names the same model, so sampling with it is fine.
    reused = _run("lstm_jax.sample", "--flagfile=experiments/smoke.flags", f"--workdir={workdir}")
    assert reused.returncode == 0, reused.stderr[-2000:]
