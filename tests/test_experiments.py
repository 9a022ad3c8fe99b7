"""Every committed experiment flagfile parses with `main`'s flags into a valid configuration."""

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
