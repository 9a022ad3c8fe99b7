"""Comparing runs: `python -m lstm_jax.report` agrees with the metrics files and draws a real PNG;
`main` saves every flag beside them."""

import importlib.util
import json

import pytest
from subprocesses import run_module

from lstm_jax.config import Config, leaf_fields
from lstm_jax.report import read_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CELLS = ("lstm", "gru")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_text):
    """Two tiny runs through the real command line, one LSTM and one GRU: their workdirs."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "small.txt").write_text(small_text)
    workdirs = []
    for cell in CELLS:
        workdir = tmp / f"run_{cell}"
        result = run_module(
            "lstm_jax.main",
            f"--data_path={tmp / 'small.txt'}",
            f"--workdir={workdir}",
            f"--cell={cell}",
            "--embed_dim=8",
            "--hidden=16",
            "--num_layers=1",
            "--seq_len=16",
            "--global_batch=8",
            "--num_steps=12",
            "--warmup_steps=2",
            "--learning_rate=0.01",
            "--log_every=4",
            "--eval_every=4",
            "--checkpoint_every=12",
            "--length=5",
            "--jax_disable_most_optimizations",  # Behaviour, not speed: compile faster.
        )
        assert result.returncode == 0, result.stderr[-3000:]
        workdirs.append(workdir)
    return workdirs


def _table_rows(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[1:-1] == [
        " run ",
        " cell ",
        " parameters ",
        " steps ",
        " wall time ",
        " best val bpc ",
        " test bpc ",
        " chars/s ",
    ]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[2:]]


def _seconds(duration: str) -> int:
    hours, minutes, seconds = (int(part) for part in duration.split(":"))
    return 3600 * hours + 60 * minutes + seconds


def test_report_table_matches_the_metrics_files_and_curves_png_is_an_image(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    result = run_module("lstm_jax.report", f"--out={out}", *map(str, two_runs))
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if has_matplotlib:
        assert result.returncode == 0, result.stderr
    else:  # The table comes first; then one line says how to get the curves.
        assert result.returncode == 1 and "pip install 'lstm_jax[report]'" in result.stderr
    rows = _table_rows(result.stdout)
    assert len(rows) == len(two_runs)
    for row, workdir, cell in zip(rows, two_runs, CELLS, strict=True):
        records = [
            json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
        ]
        (start,) = [r for r in records if "parameters" in r]
        last_train = [r for r in records if "train_loss" in r][-1]
        val_bpcs = [r["val_bpc"] for r in records if "val_bpc" in r]
        assert len(val_bpcs) == 3
        name, row_cell, parameters, steps, wall, best, test, chars = row
        assert (name, row_cell) == (workdir.name, cell)
        assert int(parameters.replace(",", "")) == start["parameters"]
        timed = [r for r in records if "wall_seconds" in r]
        assert int(steps) == 12 == timed[-1]["step"]
        assert abs(_seconds(wall) - timed[-1]["wall_seconds"]) <= 0.5
        assert float(best) == pytest.approx(min(val_bpcs), abs=5e-5)
        (test_record,) = [r for r in records if "test_bpc" in r]  # The finished run's test.
        assert float(test) == pytest.approx(test_record["test_bpc"], abs=5e-5)
        throughput = 12 * start["chars_per_step"] / last_train["train_seconds"]
        assert int(chars.replace(",", "")) == pytest.approx(throughput, abs=0.5)
    if not has_matplotlib:
        pytest.skip("the report extra (matplotlib) is not installed: curves.png not checked")
    from matplotlib import image

    assert out.read_bytes().startswith(PNG_SIGNATURE)
    pixels = image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # Something is drawn.


def test_main_saves_every_flag_as_a_flagfile(two_runs):
    lines = (two_runs[1] / "flags.txt").read_text().splitlines()
    assert "--cell=gru" in lines and "--dropout_at=between" in lines  # Given, and a default.
    for _, field, kind in leaf_fields(Config):
        name = field.name
        if kind is bool:
            assert f"--{name}" in lines or f"--no{name}" in lines, name
        else:
            assert any(line.startswith(f"--{name}=") for line in lines), name


def test_report_without_metrics_is_one_error_line(tmp_path):
    result = run_module("lstm_jax.report", f"--out={tmp_path / 'c.png'}", str(tmp_path))
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"error: No metrics.jsonl in {tmp_path}: is it a training run's --workdir?"
    )


def test_records_a_resume_or_restart_superseded_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 0, "parameters": 10},
        {"step": 4, "val_bpc": 3.0},
        {"step": 8, "val_bpc": 2.5},  # Checkpointed at 4, killed after 8: step 8 runs again.
        {"step": 4, "parameters": 10},
        {"step": 8, "val_bpc": 2.6},
        {"step": 0, "parameters": 20},  # --restart: a new run in the same workdir.
        {"step": 4, "val_bpc": 2.9},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 8, "val')
    assert read_records(path) == [{"step": 0, "parameters": 20}, {"step": 4, "val_bpc": 2.9}]


# Every way a line can be unusable, with the reason the warning gives; line numbers from 1.
DAMAGED_LINES = [
    (b'{"step": 0, "parameters": 10, "cell": "lstm", "chars_per_step": 128}', None),
    (b"[1, 2]", "not a JSON object but list"),
    (b"3", "not a JSON object but int"),
    (b'{"val_bpc": 2.0}', 'no "step"'),
    (b'{"step": 4, "val_bpc": "low"}', "\"val_bpc\" is 'low', not a number"),
    (b'{"step": "4", "val_bpc": 2.0}', "\"step\" is '4', not an integer"),
    (b'{"step": 4, "wall_seconds": Infinity}', '"wall_seconds" is inf, not a finite number'),
    (b'\xff\xfe{"step": 4}', "not UTF-8 (byte 0)"),
    (b'{"step": 4, "val_bpc": 2.5, "wall_seconds": 10.0}', None),
    (b'{"step": 8, "val', "not JSON"),  # Torn by a killed run, then resumed on a fresh line.
    (b'{"step": 8, "val_bpc": 2.25, "wall_seconds": 20.0}', None),
    (b'{"step": 12, "wall_', "not JSON"),  # Torn, and nothing came after.
]


def test_report_skips_each_unusable_line_with_a_warning_naming_it_and_reports_the_rest(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    path = workdir / "metrics.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in DAMAGED_LINES))
    result = run_module("lstm_jax.report", f"--out={tmp_path / 'c.png'}", str(workdir))
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert result.returncode == (0 if has_matplotlib else 1), result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == sum(why is not None for _, why in DAMAGED_LINES)
    for number, (_, why) in enumerate(DAMAGED_LINES, 1):
        if why is not None:
            (warning,) = [w for w in warnings if f"{path}:{number}: skipped" in w]
            assert why in warning, warning
    assert "killed" in warnings[-1]  # The last line, cut short.
    (row,) = _table_rows(result.stdout)
    assert row[:6] == ["run", "lstm", "10", "8", "0:00:20", "2.2500"]


def test_report_of_a_file_with_no_usable_line_is_one_error_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'[1, 2]\n{"val_bpc": 2.0}\n\xff\n{"step": 4, "va')
    result = run_module("lstm_jax.report", f"--out={tmp_path / 'c.png'}", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"No line of {tmp_path / 'metrics.jsonl'} is a metrics record" in error
    assert result.stdout == "" and not (tmp_path / "c.png").exists()
