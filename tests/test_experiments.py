"""Every committed experiment flagfile parses with `main`'s flags into a valid configuration, and
every experiment script starts: `--help`, and an error line for a missing run folder."""

import subprocess
import sys

from subprocesses import ROOT, command_env

FLAGFILES = sorted((ROOT / "experiments").rglob("*.flags"))

_CHECK = """
import sys
from absl import flags
from lstm_jax import cli
from lstm_jax.config import Config
from lstm_jax.distributed import DistributedOptions
for spec in (Config, DistributedOptions):
    cli.define_flags(spec)
for path in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", f"--flagfile={path}"])
    cli.read_flags(Config).validate()
    print("valid", path)
"""


def test_every_experiment_flagfile_is_a_valid_run():
    assert len(FLAGFILES) >= 8  # smoke, seed, the two 2 x 512 recipes, five cells.
    result = subprocess.run(
        [sys.executable, "-c", _CHECK, *map(str, FLAGFILES)],
        cwd=ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("valid ") == len(FLAGFILES)


SCRIPTS = sorted((ROOT / "experiments").glob("*.py"))
TAKES_A_WORKDIR = ("cache_sweep.py", "dynamic_sweep.py", "score_checkpoints.py")


def _script(path, *args) -> subprocess.CompletedProcess:
    env = command_env() | {"PYTHONPATH": str(ROOT)}  # This tree's package, as a user's install.
    return subprocess.run(
        [sys.executable, str(path), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_every_experiment_script_answers_help_and_a_missing_workdir_in_one_line(tmp_path):
    # Each script imports what the package has today (two once imported a moved function).
    assert {p.name for p in SCRIPTS} >= {"compressors.py", *TAKES_A_WORKDIR}
    for path in SCRIPTS:
        shown = _script(path, "--help")
        assert shown.returncode == 0 and "usage:" in shown.stdout, (path, shown.stderr[-2000:])
    for name in TAKES_A_WORKDIR:
        missing = _script(ROOT / "experiments" / name, str(tmp_path / "nowhere"))
        assert missing.returncode in (1, 2) and "Traceback" not in missing.stderr, missing.stderr
        line = missing.stderr.strip().splitlines()[-1]  # argparse puts its usage line first.
        assert "error: " in line and "nowhere" in line and "checkpoint" in line, line


def _lstm_parameters(hidden: int) -> int:
    # Closed form for 2 LSTM layers over a 64-wide embedding, 96 characters: each layer
    # 4h(n + h) weights and 4h biases, then the output layer and the embedding table.
    first, second = 4 * hidden * (64 + hidden) + 4 * hidden, 4 * hidden * 2 * hidden + 4 * hidden
    return first + second + hidden * 96 + 96 + 96 * 64


def test_cell_study_widths_are_the_nearest_to_the_target_and_bad_cells_are_one_line(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cell_study", ROOT / "experiments/cell_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    for target in (1_000_000, 250_000):
        hidden, count = study.width_for("lstm", "plain", target)
        assert count == _lstm_parameters(hidden)
        assert hidden % 16 == 0
        for other in (hidden - 16, hidden + 16):
            assert abs(_lstm_parameters(other) - target) >= abs(count - target)
    assert study.width_for("lstm", "plain", 1_000_000) == (272, 991_968)
    bad = _script(ROOT / "experiments/cell_study.py", "--cells=lstm,transformer", "--plan")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "transformer" in bad.stderr.strip().splitlines()[-1]
    planned = _script(
        ROOT / "experiments/cell_study.py", "--cells=lstm,gru", "--block=prenorm", "--plan",
        f"--out={tmp_path}",
    )  # fmt: skip
    lines = planned.stdout.strip().splitlines()
    assert planned.returncode == 0 and [line.split(":")[0] for line in lines] == [
        "lstm, prenorm", "gru, prenorm",
    ], planned.stdout  # fmt: skip
    both = _script(ROOT / "experiments/cell_study.py", "--block=prenorm", "--prenorm=2", "--plan")
    assert both.returncode == 2 and "name them in --cells" in both.stderr.strip().splitlines()[-1]
