"""A hostile but fair new user, as a table: bad input and faults across every command.

Each row runs the real command in a subprocess against its own copy of a trained workdir and
asserts the whole promise: the exit code, exactly one `error:` line (absl's `FATAL` line for a
flag it cannot parse; the launcher's one `local.sh:` line) containing the phrase, no Traceback,
and every file of the workdir (checkpoints, flags.txt, metrics.jsonl, a lock) byte-identical
afterwards. docs/reliability.md lists the families.

The run-time faults that need a run in progress (a save failing mid-run, a second Ctrl-C, two
live trainers) are in tests/test_workdir.py; SIGTERM and SIGKILL in tests/test_reliability.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subprocesses import ROOT, command_env, run, run_module

from lstm_jax.workdir import LOCK_FILE, _process_start

TRAIN = [
    "--embed_dim=8",
    "--hidden=32",
    "--num_layers=1",
    "--seq_len=16",
    "--global_batch=8",
    "--num_steps=10",
    "--log_every=5",
    "--eval_every=5",
    "--checkpoint_every=5",
    "--length=10",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_text) -> tuple[Path, Path]:
    """A finished tiny run (checkpoints at steps 5 and 10) and the text it trained on."""
    folder = tmp_path_factory.mktemp("hostile")
    text = folder / "text.txt"
    text.write_text(small_text)
    workdir = folder / "run"
    result = run_module("lstm_jax.main", *TRAIN, f"--data_path={text}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, text


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- Set-ups: what the user (or a fault) did to the workdir before the command -------------------


@contextlib.contextmanager
def _no_setup(workdir: Path):
    yield


@contextlib.contextmanager
def _held_by_a_live_trainer(workdir: Path):
    """The lock of a trainer that is running (this test process stands in for it)."""
    lock = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _process_start(os.getpid()),
        "since": time.time(),
        "command": "python -m lstm_jax.main --workdir=...",
    }
    (workdir / LOCK_FILE).write_text(json.dumps(lock))
    yield


@contextlib.contextmanager
def _immutable_workdir(workdir: Path):
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(workdir)]).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(workdir)], check=True)


def _damaged_meta(text: str):
    @contextlib.contextmanager
    def setup(workdir: Path):
        (workdir / "checkpoints" / "10" / "meta" / "metadata").write_text(text)
        yield

    return setup


@contextlib.contextmanager
def _metrics_not_utf8(workdir: Path):
    (workdir / "metrics.jsonl").write_bytes(b"\xff\xfe not json\n\x80\x81\n")
    yield


# --- The table ---------------------------------------------------------------------------------

# (family, name, command, args, exit code, phrase, set-up). In args, {W} is the workdir (a copy
# of the trained one), {T} the text it trained on, {name} a file from `_files`, {tmp} a folder.
# `main` rows get the run's own flags first, so each row differs from a valid resume only in
# what it names.
M, S, E, B = "lstm_jax.main", "lstm_jax.sample", "lstm_jax.evaluate", "lstm_jax.bench"
ROWS = [
    # Numbers that are not numbers, or out of range.
    ("numbers", "learning_rate inf", M, ["--learning_rate=inf"], 2, "--learning_rate"),
    ("numbers", "weight_decay nan", M, ["--weight_decay=nan"], 2, "--weight_decay"),
    ("numbers", "num_epochs inf", M, ["--num_epochs=inf", "--num_steps=0"], 2, "--num_epochs"),
    ("numbers", "seed -1", M, ["--seed=-1"], 2, "--seed"),
    ("numbers", "seed 2**32", M, ["--seed=4294967296"], 2, "--seed"),
    ("numbers", "seed beyond 64 bits", M, ["--seed=99999999999999999999999"], 2, "--seed"),
    ("numbers", "dropout 1.5", M, ["--dropout=1.5"], 2, "--dropout"),
    ("numbers", "batch 0", M, ["--global_batch=0"], 2, "--global_batch"),
    ("numbers", "val_fraction 0", M, ["--val_fraction=0"], 2, "--val_fraction"),
    ("numbers", "no training text", M, ["--val_fraction=0.5", "--test_fraction=0.5"], 2,
     "no training text"),
    ("numbers", "negative test_fraction", M, ["--test_fraction=-0.1"], 2, "--test_fraction"),
    ("numbers", "negative gutenberg", M, ["--gutenberg=-3"], 2, "--gutenberg must be >= 0"),
    ("numbers", "process_id -2", M, ["--process_id=-2"], 2, "--process_id must be >= -1"),
    ("numbers", "weight_drop 1", M, ["--weight_drop=1"], 2, "--weight_drop"),
    ("numbers", "ema_decay 1", M, ["--ema_decay=1"], 2, "--ema_decay"),
    ("numbers", "max_text_mb 0", M, ["--max_text_mb=0"], 2, "--max_text_mb"),
    ("numbers", "not a number", M, ["--learning_rate=fast"], 1, "--learning_rate"),
    ("numbers", "seq_len beyond validation", M, ["--seq_len=5000", "--global_batch=1"], 2,
     "--seq_len"),
    ("numbers", "sample temperature nan", S, ["--temperature=nan"], 2, "--temperature"),
    ("numbers", "sample num_samples -1", S, ["--num_samples=-1"], 2, "--num_samples"),
    ("numbers", "sample length 0", S, ["--length=0"], 2, "--length"),
    ("numbers", "sample top_k beyond vocabulary", S, ["--top_k=1000"], 2, "--top_k"),
    ("numbers", "sample top_p 0", S, ["--top_p=0"], 2, "--top_p"),
    ("numbers", "evaluate streams 0", E, ["--streams=0"], 2, "--streams"),
    ("numbers", "evaluate dynamic_lr nan", E, ["--dynamic", "--dynamic_lr=nan"], 2,
     "--dynamic_lr"),
    ("numbers", "bench hidden 0", B, ["--hidden=0"], 2, "--hidden"),
    ("numbers", "bench sizes beyond memory", B, ["--hidden=1000000"], 2, "memory"),
    # Each size bench allocates, estimated before compiling (was: the matmul's out-of-memory
    # traceback after the training step had compiled and run).
    ("numbers", "bench matmul beyond memory", B, ["--hidden=16", "--num_layers=1",
     "--matmul_size=100000"], 2, "Lower --matmul_size."),
    ("numbers", "bench batch x seq_len beyond memory", B, ["--global_batch=100000",
     "--seq_len=100000"], 2, "Lower --global_batch or --seq_len."),
    ("numbers", "bench generate_length beyond memory", B, ["--generate_length=100000000000"], 2,
     "Lower --generate_length."),
    ("numbers", "bench population beyond memory", B, ["--population=4096", "--hidden=4096"], 2,
     "A population of 4096 members"),
    # Flags a command does not read, and stray words.
    ("flags", "main given a sampling flag", M, ["--top_k=5"], 1, "flag 'top_k'"),
    ("flags", "sample given a model flag", S, ["--hidden=512"], 1, "flag 'hidden'"),
    ("flags", "sample given training flags", S, ["--data_path=/nonexistent"], 1,
     "flag 'data_path'"),
    ("flags", "evaluate given a training flag", E, ["--learning_rate=-1"], 1,
     "flag 'learning_rate'"),
    ("flags", "unknown schedule", M, ["--schedule=linear"], 1, "--schedule"),
    ("flags", "stray argument", M, ["hidden=5"], 2, "Unexpected arguments"),
    # Workdir paths and what the workdir holds.
    ("workdir", "empty workdir", M, ["--workdir="], 2, "--workdir is empty"),
    ("workdir", "workdir is a file", M, ["--workdir={T}"], 1, "is a file"),
    ("workdir", "another model's workdir", M, ["--hidden=64"], 1, "hidden 32 (saved) vs 64"),
    ("workdir", "another text's vocabulary", M, ["--data_path={other}"], 1,
     "only in the saved run"),
    ("workdir", "held by a live trainer", M, [], 1, "in use by another trainer",
     _held_by_a_live_trainer),
    ("workdir", "cannot be written", M, [], 1, "Cannot write in", _immutable_workdir),
    ("workdir", "sample an empty folder", S, ["--workdir={tmp}"], 1, "No checkpoint"),
    ("workdir", "sample an unknown step", S, ["--checkpoint=12345"], 1, "--checkpoint=12345"),
    ("workdir", "fine-tune from nowhere", M, ["--init_from={tmp}/nothing", "--workdir={tmp}/new"],
     1, "--init_from"),
    # Text that is not text, or not there.
    ("text", "missing file", M, ["--data_path={tmp}/nope.txt"], 1, "does not exist"),
    ("text", "a folder holding an empty file", M, ["--data_path={empty_folder}"], 1,
     "empty.txt is empty"),
    ("text", "empty file", M, ["--data_path={empty}"], 1, "is empty"),
    ("text", "latin-1 bytes", M, ["--data_path={latin1}"], 1, "--encoding"),
    ("text", "UTF-16 with a BOM", M, ["--data_path={utf16}"], 1, "--encoding=utf-16"),
    ("text", "NUL bytes", M, ["--data_path={nul}"], 1, "binary"),
    ("text", "a FIFO", M, ["--data_path={fifo}"], 1, "not a regular file"),
    ("text", "a device", M, ["--data_path=/dev/zero"], 1, "not a regular file"),
    ("text", "2 GB sparse file", M, ["--data_path={sparse}"], 1, "--max_text_mb"),
    ("text", "too short for a batch", M, ["--data_path={short}"], 1, "too short"),
    ("text", "glob matching nothing", M, ["--data_path={tmp}/*.none"], 1, "matches no"),
    ("text", "evaluate a binary text", E, ["--text={nul}"], 1, "binary"),
    ("text", "sample a prompt from a device", S, ["--prompt_file=/dev/zero"], 1,
     "not a regular file"),
    ("text", "sample unseen prompt characters", S, ["--prompt=Zoë ☃"], 1, "--unknown=skip"),
    # Damaged checkpoints and metrics.
    ("damaged", "sample: metadata not JSON", S, ["--checkpoint=10"], 1, "unreadable",
     _damaged_meta("{not json")),
    ("damaged", "sample: metadata without settings", S, ["--checkpoint=10"], 1, "no settings",
     _damaged_meta('{"vocab": "abc"}')),
    ("damaged", "evaluate: metadata a list", E, ["--checkpoint=10"], 1, "unreadable",
     _damaged_meta("[]")),
    ("damaged", "report: metrics not UTF-8", "lstm_jax.report", [], 1, "metrics.jsonl",
     _metrics_not_utf8),
    # Outputs that cannot be written.
    ("outputs", "bench --json a folder", B, ["--json={tmp}"], 1, "is a folder"),
    ("outputs", "export without --out", "lstm_jax.export", [], 2, "--out"),
    ("outputs", "export into a non-empty folder", "lstm_jax.export", ["--out={W}"], 1,
     "--overwrite"),
    # The launcher's environment.
    ("launcher", "DEVICES_PER_PROCESS=x2", "local.sh", ["DEVICES_PER_PROCESS=x2"], 2,
     "DEVICES_PER_PROCESS"),
    ("launcher", "DEVICES_PER_PROCESS=0", "local.sh", ["DEVICES_PER_PROCESS=0"], 2,
     "DEVICES_PER_PROCESS"),
    ("launcher", "PORT out of range", "local.sh", ["PORT=70000"], 2, "PORT"),
    ("launcher", "PYTHON missing", "local.sh", ["PYTHON=/nonexistent/python"], 2, "PYTHON"),
]


def _files(tmp: Path, small_text: str) -> dict[str, str]:
    def write(name: str, data: bytes) -> str:
        (tmp / name).write_bytes(data)
        return str(tmp / name)

    tmp.mkdir()
    os.mkfifo(tmp / "fifo")
    with open(tmp / "sparse.txt", "wb") as f:
        f.truncate(2 * 2**30)
    (tmp / "folder").mkdir()
    (tmp / "folder" / "empty.txt").write_bytes(b"\n")
    return {
        "empty_folder": str(tmp / "folder"),
        "empty": write("empty.txt", b"  \n"),
        "latin1": write("latin1.txt", "Café au lait. ".encode("latin-1") * 100),
        "utf16": write("utf16.txt", small_text.encode("utf-16")),
        "nul": write("nul.txt", b"\0" * 10_000),
        "short": write("short.txt", b"Too short.\n" * 5),
        "other": write("other.txt", small_text.upper().encode()),
        "fifo": str(tmp / "fifo"),
        "sparse": str(tmp / "sparse.txt"),
    }


def _command(command: str, args: list[str], workdir: Path, text: Path) -> tuple[list[str], dict]:
    env = command_env()
    if command == "local.sh":  # Args are its environment; the flags are a valid run's.
        env.update(a.split("=", 1) for a in args)
        return ["bash", "launch/local.sh", "2", *TRAIN, f"--workdir={workdir}"], env
    base = {
        "lstm_jax.main": [*TRAIN, f"--data_path={text}", f"--workdir={workdir}"],
        "lstm_jax.report": [str(workdir)],
        "lstm_jax.bench": [],
    }.get(command, [f"--workdir={workdir}"])
    return [sys.executable, "-m", command, *base, *args], env


@pytest.mark.parametrize(
    "family, name, command, args, code, phrase, setup",
    [(*row, _no_setup) if len(row) == 6 else row for row in ROWS],
    ids=[f"{row[0]}: {row[1]}" for row in ROWS],
)
def test_hostile_input_is_one_clear_line_and_changes_nothing(
    trained, small_text, tmp_path, family, name, command, args, code, phrase, setup
):
    source, text = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    files = _files(tmp_path / "files", small_text)
    (tmp_path / "empty_folder").mkdir()
    values = {"W": str(workdir), "T": str(text), "tmp": str(tmp_path / "empty_folder"), **files}
    args = [a.format(**values) if "{" in a else a for a in args]
    argv, env = _command(command, args, workdir, text)
    with setup(workdir):
        before = _snapshot(workdir)
        result = run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        after = _snapshot(workdir)
    stderr = result.stderr
    assert result.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    prefixes = ("local.sh",) if command == "local.sh" else ("error", "FATAL")
    lines = [line for line in stderr.splitlines() if line.startswith(prefixes)]
    assert len(lines) == 1 and phrase in lines[0], stderr[-3000:]
    assert after == before, "the workdir changed"


def test_the_table_covers_every_family_with_at_least_50_rows():
    families = {row[0] for row in ROWS}
    assert len(ROWS) >= 50
    assert families == {"numbers", "flags", "workdir", "text", "damaged", "outputs", "launcher"}


# --- Output into a closed pipe -------------------------------------------------------------------

BENCH_TINY = ["--hidden=16", "--num_layers=1", "--global_batch=8", "--seq_len=16", "--windows=1",
              "--steps_per_window=1", "--untimed_steps=0", "--generate_length=10",
              "--matmul_size=64"]  # fmt: skip
# (command, args, reader). `head -c 0` has gone before the command's first write, so every
# command meets the closed pipe; sample streams 10 million characters into `head -c 100`, which
# must stop it at once (generating them all would take hours). export prints only to stderr.
PIPED = [
    (S, ["--length=10000000"], "| head -c 100"),
    (E, ["--split=val"], "| head -c 0"),
    ("lstm_jax.info", [], "| head -c 0"),
    ("lstm_jax.report", ["--out={tmp}/curves.png"], "| head -c 0"),
    (B, [*BENCH_TINY, "--json={tmp}/bench.json"], "| head -c 0"),
    ("lstm_jax.export", ["--out={tmp}/exported"], "2>&1 | head -c 0"),
]


@pytest.mark.parametrize("command, args, reader", PIPED, ids=[row[0] for row in PIPED])
def test_output_into_a_closed_pipe_stops_quietly(trained, tmp_path, command, args, reader):
    source, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    args = [a.format(tmp=tmp_path) for a in args]
    base = {"lstm_jax.report": [str(workdir)], B: []}.get(command, [f"--workdir={workdir}"])
    line = " ".join(shlex.quote(a) for a in [sys.executable, "-m", command, *base, *args])
    stderr = tmp_path / "stderr.txt"
    redirect = "" if reader.startswith("2>&1") else f"2>{shlex.quote(str(stderr))}"
    # pipefail: the command's own status, not head's.
    script = f"set -o pipefail; {line} {redirect} {reader}"
    before = _snapshot(workdir)
    started = time.perf_counter()
    result = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=command_env(), capture_output=True, timeout=120
    )
    seconds = time.perf_counter() - started
    errors = stderr.read_text() if stderr.exists() else ""
    assert result.returncode in (0, 141), errors[-3000:]
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors[-3000:]
    assert _snapshot(workdir) == before, "the workdir changed"
    if command == S:
        assert seconds < 60, f"sampling went on for {seconds:.0f} s after its reader left"
