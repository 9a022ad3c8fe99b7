"""Run tracking: metrics.jsonl holds every field, TensorBoard gets the same numbers plus the
run's settings and samples as text, and the JSON lines do not depend on the optional
tensorboardX."""

import json
import struct
import sys

import jax
import pytest

from lstm_jax import metrics as metrics_module
from lstm_jax.config import Config
from lstm_jax.data import Vocab, load_corpus
from lstm_jax.metrics import MetricsFile
from lstm_jax.models import build_model, count_params, init_params
from lstm_jax.train import train_and_evaluate

TRAIN_FIELDS = {
    "time",
    "step",
    "wall_seconds",
    "train_seconds",
    "train_loss",
    "train_bpc",
    "chars_per_second",
    "learning_rate",
    "grad_norm",
}
VAL_FIELDS = {"time", "step", "wall_seconds", "train_seconds", "val_loss", "val_bpc"}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, small_text):
    """A tiny GRU run to step 8, then resumed to step 12: (config, its metrics records, the
    messages it logged)."""
    tmp = tmp_path_factory.mktemp("tracked")
    (tmp / "small.txt").write_text(small_text)
    config = Config.create(
        data_path=str(tmp / "small.txt"),
        workdir=str(tmp / "run"),
        cell="gru",
        embed_dim=8,
        hidden=16,
        seq_len=16,
        global_batch=8,
        num_steps=8,
        warmup_steps=2,
        learning_rate=1e-2,
        log_every=4,
        eval_every=4,
        checkpoint_every=4,
        length=5,
    )
    devices, logged = jax.local_devices()[:1], []
    train_and_evaluate(config, devices=devices, log=logged.append)
    train_and_evaluate(config.replace(num_steps=12), devices=devices, log=logged.append)
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    return config, [json.loads(line) for line in lines], logged


def test_metrics_jsonl_has_every_field_of_every_record(resumed_run):
    config, records, _ = resumed_run
    starts = [r for r in records if "parameters" in r]
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    tests = [r for r in records if "test_loss" in r]
    assert len(starts) + len(train) + len(val) + len(tests) == len(records)
    # Each finished run (the first, then the resumed one) tests its best checkpoint once.
    assert len(tests) == 2
    for record in tests:
        assert set(record) == {"time", "step", "test_loss", "test_bpc", "test_of"}
    assert [r["step"] for r in starts] == [0, 8]  # The resume announces where it starts.
    model = build_model(config, Vocab.from_text(load_corpus(config.data)[0]).size)
    for start in starts:
        assert start["cell"] == "gru"
        assert start["parameters"] == count_params(init_params(model, jax.random.key(0)))
        assert start["chars_per_step"] == config.data.global_batch * config.data.seq_len
    assert [r["step"] for r in train] == [4, 8, 12] == [r["step"] for r in val]
    for record in train:
        assert set(record) == TRAIN_FIELDS
    for record in val:
        assert set(record) == VAL_FIELDS
        assert record["val_bpc"] == pytest.approx(record["val_loss"] / 0.6931471805599453)


def test_wall_time_includes_training_and_continues_across_a_resume(resumed_run):
    _, records, _ = resumed_run
    timed = [r for r in records if "wall_seconds" in r]
    walls = [r["wall_seconds"] for r in timed]
    assert walls == sorted(walls) and walls[0] > 0
    assert all(r["wall_seconds"] >= r["train_seconds"] for r in timed)
    trains = [r["train_seconds"] for r in timed]
    assert trains == sorted(trains)


def _tensorboard_values(folder):
    """(step, summary value) of every summary in every TFRecord event file in `folder`."""
    from tensorboardX.proto import event_pb2

    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event files in {folder}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its CRC, the record, its CRC.
            for value in event.summary.value:
                yield event.step, value


def _tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the scalars."""
    scalars: dict[str, dict[int, float]] = {}
    for step, value in _tensorboard_values(folder):
        if not value.HasField("tensor"):
            scalars.setdefault(value.tag, {})[step] = value.simple_value
    return scalars


def _tensorboard_texts(folder) -> dict[str, list[tuple[int, str]]]:
    """tag -> [(step, text)] of the text summaries, in order, their code-block indent removed."""
    texts: dict[str, list[tuple[int, str]]] = {}
    for step, value in _tensorboard_values(folder):
        if value.metadata.plugin_data.plugin_name == "text":
            markdown = value.tensor.string_val[0].decode()
            assert all(line.startswith("    ") for line in markdown.split("\n")), markdown
            text = "\n".join(line[4:] for line in markdown.split("\n"))
            texts.setdefault(value.tag.removesuffix("/text_summary"), []).append((step, text))
    return texts


def test_tensorboard_events_hold_the_numbers_of_metrics_jsonl(resumed_run):
    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
    config, records, _ = resumed_run
    from pathlib import Path

    scalars = _tensorboard_scalars(Path(config.loop.workdir))
    assert len(list(Path(config.loop.workdir).glob("events.out.tfevents.*"))) == 2  # Run, resume.
    for key in TRAIN_FIELDS - {"time", "step"}:
        logged = {r["step"]: r[key] for r in records if key in r}  # The last of a step wins.
        assert scalars[key].keys() >= logged.keys(), key
        for step, value in logged.items():
            assert scalars[key][step] == pytest.approx(value, rel=1e-6), key
    val = {r["step"]: r["val_bpc"] for r in records if "val_bpc" in r}
    assert scalars["val_bpc"] == pytest.approx(val, rel=1e-6)


def test_tensorboard_text_holds_the_runs_settings_and_the_samples_it_logged(resumed_run):
    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
    config, _, logged = resumed_run
    from pathlib import Path

    texts = _tensorboard_texts(Path(config.loop.workdir))
    # The settings, as flags, at the step each run (the first, then the resume) starts from.
    assert [step for step, _ in texts["settings"]] == [0, 8]
    for (_, text), num_steps in zip(texts["settings"], (8, 12), strict=True):
        flags = text.splitlines()
        assert "--cell=gru" in flags and "--hidden=16" in flags and "--nolowercase" in flags
        assert f"--num_steps={num_steps}" in flags and f"--workdir={config.loop.workdir}" in flags
    # Each run's closing sample, exactly as the log has it.
    ends = [m.split("sample:\n", 1)[1] for m in logged if m.startswith("Finished")]
    assert texts["sample"] == [(8, ends[0]), (12, ends[1])]
    assert all("|" in sample for sample in ends)


def test_without_tensorboardx_metrics_jsonl_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # Importing it raises ImportError.
    metrics = MetricsFile(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path)
    metrics.write(step=1, train_loss=2.5)
    metrics.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["train_loss"] == 2.5
    assert not list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("appendable", [True, False], ids=["local_append", "gs_rewrite"])
def test_a_resumed_run_starts_on_a_new_line_after_a_torn_last_line(tmp_path, appendable):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 4, "train_loss": 2.0}\n{"step": 8, "train_lo')  # Killed mid-write.
    metrics = MetricsFile(path)
    metrics._appendable = appendable  # False: the whole-file rewrite that gs:// paths take.
    metrics.write(step=4, train_loss=2.5)
    metrics.write(step=8, train_loss=2.25)
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"step": 8, "train_lo' and lines[-1] == b""  # Kept, alone on its line.
    records = [json.loads(line) for number, line in enumerate(lines[:-1]) if number != 1]
    assert [(r["step"], r["train_loss"]) for r in records] == [(4, 2.0), (4, 2.5), (8, 2.25)]


def test_the_end_of_an_appended_file_is_checked_once_not_every_write(tmp_path, monkeypatch):
    checked = []
    monkeypatch.setattr(metrics_module, "_last_byte", lambda path: checked.append(path) or b"}")
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in range(3):
        metrics.write(step=step)
    assert len(checked) == 1
    # The stand-in says the file ends mid-line: only the first write starts a new one.
    assert (tmp_path / "metrics.jsonl").read_bytes().count(b"\n") == 4


def test_a_resumed_runs_clock_sums_its_processes_but_since_start_is_this_ones():
    # The first-step line of a resumed run reports its compile, not the earlier processes' time.
    from lstm_jax.metrics import Timer

    timer = Timer(earlier_wall_seconds=400.0)
    assert timer.wall_seconds() >= 400.0
    assert 0.0 <= timer.since_start() < 60.0
