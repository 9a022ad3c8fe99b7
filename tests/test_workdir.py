"""The run folder under faults: two trainers, stale locks, folders that cannot be written, a full
disk, failed background saves, half-deleted checkpoints, damaged metadata, a second Ctrl-C.

File-system faults are real: `chattr +i` (an immutable folder: even root gets EPERM) and a small
tmpfs (ENOSPC). They need root (as the CI machine has); elsewhere those tests skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subprocesses import run_module, start_module

from lstm_jax import workdir as workdir_module
from lstm_jax.checkpoint import Checkpoints
from lstm_jax.errors import UserError
from lstm_jax.finetune import _init_source
from lstm_jax.info import describe
from lstm_jax.reader import population_size, restore_model
from lstm_jax.train import train_and_evaluate
from lstm_jax.workdir import LOCK_FILE, Holder, claim


def _train_args(text_path: Path, workdir: Path, **overrides) -> list[str]:
    flags = {
        "data_path": text_path,
        "workdir": workdir,
        "embed_dim": 8,
        "hidden": 32,
        "num_layers": 1,
        "seq_len": 16,
        "global_batch": 8,
        "num_steps": 100_000,
        "log_every": 1,
        "eval_every": 1000,
        "checkpoint_every": 5,
        "keep_checkpoints": 1000,
    }
    flags.update(overrides)
    return ["lstm_jax.main", *(f"--{k}={v}" for k, v in flags.items())]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error", "FATAL"))]


def _wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _finished_process_id() -> int:
    """The PID of a process that has exited (not reused in the moment the test needs it)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@contextlib.contextmanager
def _immutable(folder: Path):
    """`chattr +i`: nothing can be created, renamed or deleted in `folder`, even by root."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i is not allowed here: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# --- The lock --------------------------------------------------------------------------------


def test_a_second_claim_is_refused_naming_the_holder_and_the_first_is_released(tmp_path):
    with claim(str(tmp_path / "run")) as held:
        lock = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        with pytest.raises(UserError, match=f"in use by another trainer: process {os.getpid()} "):
            with claim(str(tmp_path / "run")):
                pass
        assert held.path == tmp_path / "run"
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with claim(str(tmp_path / "run")):  # Free again.
        pass


def _write_lock(folder: Path, **fields) -> None:
    holder = Holder.this_process()
    folder.mkdir(exist_ok=True)
    values = {**holder.__dict__, **fields}
    (folder / LOCK_FILE).write_text(json.dumps(values))


@pytest.mark.parametrize(
    "lock_fields",
    [
        {"pid": "dead"},  # The holder was killed.
        {"started": "1"},  # Its PID now belongs to another process (this one).
    ],
    ids=["holder gone", "pid reused"],
)
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, lock_fields, caplog):
    if lock_fields.get("pid") == "dead":
        lock_fields = {"pid": _finished_process_id()}
    if lock_fields.get("started") and not workdir_module._process_start(os.getpid()):
        pytest.skip("no /proc: a reused PID cannot be told from its holder")
    _write_lock(tmp_path / "run", **lock_fields)
    with claim(str(tmp_path / "run")):
        held = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["started"] != "1"
    assert "Taking over" in caplog.text and "no longer running" in caplog.text


def test_an_unreadable_lock_is_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text('{"pid": 12')  # Torn.
    with claim(str(tmp_path / "run")):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_refused_naming_the_host_and_the_file(tmp_path):
    _write_lock(tmp_path / "run", host="tpu-worker-7", pid=1)
    with pytest.raises(UserError) as refused:
        with claim(str(tmp_path / "run")):
            pass
    message = str(refused.value)
    assert "tpu-worker-7" in message and f"delete {tmp_path / 'run' / LOCK_FILE}" in message
    assert (tmp_path / "run" / LOCK_FILE).exists()  # Not ours to remove.


def test_two_trainers_on_one_workdir_the_second_is_refused_and_changes_nothing(
    small_text_path, tmp_path
):
    workdir = tmp_path / "run"
    first = start_module(*_train_args(small_text_path, workdir), compile_cache=False)
    try:
        _wait_for(lambda: (workdir / "checkpoints" / "5").is_dir())
        flags_before = (workdir / "flags.txt").read_bytes()
        second = run_module(*_train_args(small_text_path, workdir, learning_rate=0.1))
        assert second.returncode == 1, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        lines = _error_lines(second.stderr)
        assert len(lines) == 1 and f"process {first.pid} on" in lines[0], second.stderr[-2000:]
        assert (workdir / "flags.txt").read_bytes() == flags_before
        assert first.poll() is None  # The first run goes on.
    finally:
        first.kill()
        first.wait()


# --- Nothing written before the checks ---------------------------------------------------------


def test_a_refused_run_leaves_flags_txt_and_checkpoints_as_they_were(tiny_config, tmp_path):
    tiny_config = tiny_config.replace(checkpoint_every=4)
    train_and_evaluate(tiny_config, flagfile="--hidden=16\n")
    workdir = Path(tiny_config.loop.workdir)
    before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    with pytest.raises(UserError, match="other settings: hidden 16"):
        train_and_evaluate(tiny_config.replace(hidden=24), flagfile="--hidden=24\n")
    after = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    assert after == before
    assert not (workdir / LOCK_FILE).exists()


def test_a_refused_fresh_run_leaves_no_folder(tiny_config, tmp_path):
    fresh = tmp_path / "a" / "b"
    with pytest.raises(UserError, match="free"):
        with claim(str(fresh), needed_bytes=2**60):
            pass
    assert not fresh.exists()


def test_workdir_paths_that_are_not_folders_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        with claim(str(tmp_path / "file")):
            pass
    with pytest.raises(UserError, match="--workdir is empty"):
        with claim(""):
            pass


# --- Folders that cannot be written --------------------------------------------------------------


def test_an_unwritable_workdir_is_refused_before_training(tmp_path):
    (tmp_path / "run").mkdir()
    with _immutable(tmp_path / "run"):
        with pytest.raises(UserError, match="Cannot write in .*run.*Operation not permitted"):
            with claim(str(tmp_path / "run")):
                pass


def test_a_save_that_fails_mid_run_stops_it_in_one_line_naming_the_last_safe_step(
    small_text_path, tmp_path
):
    workdir = tmp_path / "run"
    process = start_module(*_train_args(small_text_path, workdir), compile_cache=False)
    try:
        _wait_for(lambda: (workdir / "checkpoints" / "10").is_dir())
        with _immutable(workdir / "checkpoints"):
            stderr = process.communicate(timeout=120)[1]  # Never a hang.
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    safe = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert "Operation not permitted" in lines[0]
    assert f"last safe checkpoint is step {safe}." in lines[0]
    assert not (workdir / LOCK_FILE).exists()
    resumed = run_module(*_train_args(small_text_path, workdir, num_steps=safe + 1))
    assert resumed.returncode == 0 and f"Resuming from step {safe}" in resumed.stderr


def test_a_disk_filling_up_mid_run_stops_it_in_one_line_naming_the_last_safe_step(
    small_text_path, tmp_path
):
    with _tmpfs(tmp_path / "small_disk", "3m") as disk:  # Room for a few checkpoints.
        result = run_module(*_train_args(small_text_path, disk / "run", hidden=64))
        saved = (disk / "run" / "checkpoints").iterdir()
        safe = max(int(p.name) for p in saved if p.name.isdigit())
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = _error_lines(result.stderr)
    # Stopped before the save that would not fit (one that fails midway would also stop the
    # run, but Orbax's background threads print tracebacks we cannot catch).
    assert len(lines) == 1 and " MiB free, " in lines[0], result.stderr[-3000:]
    assert f"last safe checkpoint is step {safe}." in lines[0] and safe >= 10


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(
    small_text_path, tmp_path
):
    with _tmpfs(tmp_path / "small_disk", "200k") as disk:
        result = run_module(*_train_args(small_text_path, disk / "run", hidden=64))
        assert not (disk / "run").exists()
    assert result.returncode == 1, result.stderr[-3000:]
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "MiB free; one checkpoint of this model needs" in lines[0]


# --- Damaged checkpoints -------------------------------------------------------------------------


@pytest.fixture
def three_checkpoints(tiny_config):
    config = tiny_config.replace(num_steps=12, checkpoint_every=4, eval_every=4, keep_checkpoints=5)
    train_and_evaluate(config)
    workdir = Path(config.loop.workdir)
    assert Checkpoints(workdir, read_only=True).steps() == [4, 8, 12]
    return config, workdir


def test_a_half_deleted_step_is_skipped_by_readers_and_set_aside_by_training(
    three_checkpoints, caplog
):
    config, workdir = three_checkpoints
    shutil.rmtree(workdir / "checkpoints" / "12" / "state")  # Killed while Orbax deleted it.
    assert Checkpoints(workdir, read_only=True).steps() == [4, 8]
    assert "some of its files are missing" in caplog.text
    _, _, _, step, _ = restore_model(workdir, "latest")
    assert step == 8
    assert (workdir / "checkpoints" / "12").is_dir()  # Readers never move anything.
    result = train_and_evaluate(config.replace(num_steps=16))
    assert result.step == 16
    assert list(workdir.glob("checkpoints.unreadable-12-*"))


@pytest.mark.parametrize(
    "metadata, why",
    [("{not json", "JSONDecodeError"), ('{"vocab": "abc"}', "no settings"), ("[]", "no vocab")],
)
def test_damaged_metadata_is_one_clear_error_for_readers(three_checkpoints, metadata, why):
    _, workdir = three_checkpoints
    (workdir / "checkpoints" / "12" / "meta" / "metadata").write_text(metadata)
    with pytest.raises(UserError, match=f"checkpoints/12 is unreadable \\({why}.*--checkpoint"):
        restore_model(workdir, "12")
    assert restore_model(workdir, "8")[3] == 8


# --- Readers beside a live trainer (issue 26, item 2) -------------------------------------------


def _deleted_while_read(monkeypatch, workdir: Path) -> list[int]:
    """The trainer's retention policy deleting the step a reader is reading, once: in the middle
    of the read, after its metadata and before its parameters."""
    original = Checkpoints.restore_model_params
    deleted: list[int] = []

    def restore_model_params(self, step, *args, **kwargs):
        if not deleted:
            deleted.append(step)
            shutil.rmtree(workdir / "checkpoints" / str(step))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "restore_model_params", restore_model_params)
    return deleted


def test_latest_deleted_while_read_gives_the_next_newest_step(three_checkpoints, monkeypatch):
    _, workdir = three_checkpoints
    deleted = _deleted_while_read(monkeypatch, workdir)
    _, _, _, step, _ = restore_model(workdir, "latest")
    assert deleted == [12] and step == 8


def test_an_explicit_step_deleted_while_read_is_said_removed_not_unreadable(
    three_checkpoints, monkeypatch
):
    _, workdir = three_checkpoints
    deleted = _deleted_while_read(monkeypatch, workdir)
    with pytest.raises(UserError) as raised:
        restore_model(workdir, "8")
    message = str(raised.value)
    assert deleted == [8] and "unreadable" not in message
    assert "step 8 was removed by the running trainer" in message and "--checkpoint" in message


def test_init_from_latest_deleted_while_read_starts_from_the_next_newest_step(
    three_checkpoints, monkeypatch
):
    _, workdir = three_checkpoints
    deleted = _deleted_while_read(monkeypatch, workdir)
    start, params = _init_source(f"{workdir}:latest", with_params=True)
    assert deleted == [12] and start.step == 8
    assert params["embed"]["embedding"].shape == (len(start.vocab), 8)


def test_init_from_an_explicit_step_deleted_while_read_is_said_removed_not_unreadable(
    three_checkpoints, monkeypatch
):
    _, workdir = three_checkpoints
    deleted = _deleted_while_read(monkeypatch, workdir)
    with pytest.raises(UserError) as raised:
        _init_source(f"{workdir}:8", with_params=True)
    message = str(raised.value)
    assert deleted == [8] and "cannot be read" not in message
    assert "step 8 was removed by the running trainer" in message
    assert f"--init_from={workdir}:STEP" in message


def test_info_lists_again_when_a_step_is_removed_while_it_reads_it(
    three_checkpoints, monkeypatch
):
    _, workdir = three_checkpoints
    original = Checkpoints.read_meta
    deleted: list[int] = []

    def read_meta(self, step):
        if step == 4 and not deleted:  # The trainer's retention policy, mid-listing.
            deleted.append(step)
            shutil.rmtree(workdir / "checkpoints" / "4")
        return original(self, step)

    monkeypatch.setattr(Checkpoints, "read_meta", read_meta)
    text = describe(str(workdir))
    assert deleted == [4] and "unreadable" not in text
    assert "2 checkpoint(s)" in text.splitlines()[0]
    assert [line.replace("*", " ").split()[0] for line in text.splitlines()[2:]][:2] == ["8", "12"]


def test_a_hundred_reads_beside_a_trainer_rotating_its_checkpoints_all_succeed(
    small_text_path, tmp_path
):
    # The trainer saves every 2 steps and keeps one besides the best, which moves as validation
    # improves: the step a reader picked is often gone before it has read it.
    workdir = tmp_path / "run"
    args = _train_args(
        small_text_path, workdir, checkpoint_every=2, eval_every=2, keep_checkpoints=1,
        log_every=100,
    )  # fmt: skip
    trainer = start_module(*args, compile_cache=False)
    try:
        _wait_for(lambda: any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")))
        readers = (
            lambda: restore_model(workdir, "latest")[3],
            lambda: restore_model(workdir, "best")[3],
            lambda: _init_source(f"{workdir}:latest", with_params=True)[0].step,
            lambda: int(describe(str(workdir)).splitlines()[2].replace("*", " ").split()[0]),
            lambda: population_size(workdir),
        )
        steps = [readers[k % len(readers)]() for k in range(100)]
        assert trainer.poll() is None, trainer.stderr.read()[-2000:]  # It trained all along.
        assert steps[4::5] == [None] * 20  # A single run's workdir, every time.
        assert len(set(steps[::5])) > 3  # The reads followed the trainer's new steps.
    finally:
        trainer.kill()
        trainer.wait()


# --- A second Ctrl-C -----------------------------------------------------------------------------


def test_a_second_ctrl_c_stops_at_once_naming_the_step_the_next_run_resumes_from(
    small_text_path, tmp_path
):
    workdir = tmp_path / "run"
    process = start_module(*_train_args(small_text_path, workdir), compile_cache=False)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "step 12/" in line:
            break
    process.send_signal(signal.SIGINT)
    time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    lines += process.stderr.readlines()
    process.wait(timeout=60)
    stderr = "".join(lines)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1 and "second Ctrl-C" in errors[0], stderr[-3000:]
    step = int(errors[0].split("resumes from step ")[1].rstrip("."))
    assert not (workdir / LOCK_FILE).exists()
    resumed = run_module(*_train_args(small_text_path, workdir, num_steps=step + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from step {step} " in resumed.stderr
