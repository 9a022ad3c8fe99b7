"""experiments/compressors.py: the held-out bpc arithmetic, checked with stand-in compressors
whose output is a header plus the input (so the answer has a closed form), the skipping of
compressors that are not installed, and one-line errors for a bad --paq8px."""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from subprocesses import ROOT, command_env

SCRIPT = ROOT / "experiments" / "compressors.py"
_spec = importlib.util.spec_from_file_location("compressors", SCRIPT)
compressors = importlib.util.module_from_spec(_spec)
sys.modules["compressors"] = compressors  # Dataclasses look their module up while being made.
_spec.loader.exec_module(compressors)

# Identity compressors with a fixed header: the header must cancel in the difference.
_IDENTITY_STREAM = "#!/bin/sh\nprintf 'HEADER'\nexec /bin/cat\n"
# paq8px's command line: `paq8px -LEVEL INPUT` writes INPUT's name + .paq8pxNNN here.
_IDENTITY_PAQ8PX = """#!/bin/sh
case "$1" in -[0-9]*) ;; *) echo "bad level $1" >&2; exit 3 ;; esac
{ printf 'PAQ%s' "$1"; /bin/cat "$2"; } > "${2##*/}.paq8px212"
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _run(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**command_env(), "PYTHONPATH": str(ROOT)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch) -> Path:
    """The folder `tempfile` uses, so a test can see that nothing is left in it."""
    folder = tmp_path / "tempdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_bpc_is_the_size_difference_in_bits_per_test_character_not_per_byte(tmp_path, own_tempdir):
    stream = compressors.Compressor(
        "identity", (str(_executable(tmp_path / "identity", _IDENTITY_STREAM)),), stream=True
    )
    # "£" is two bytes in UTF-8: 3 bytes for 2 characters, 8 bits each.
    assert compressors.held_out_bpc(stream, "ab\n", "£x") == 8 * 3 / 2
    assert compressors.held_out_bpc(stream, "", "abcd") == 8.0
    assert list(own_tempdir.iterdir()) == []


def test_paq8px_levels_run_with_a_dash_and_their_archive_is_measured(tmp_path, own_tempdir):
    binary = _executable(tmp_path / "paq8px", _IDENTITY_PAQ8PX)
    levels = compressors.paq8px_compressors(str(binary), ["8", "-8L"])
    assert [c.label for c in levels] == ["paq8px -8", "paq8px -8L"]
    for level in levels:
        assert compressors.held_out_bpc(level, "before", "tést") == 8 * 5 / 4
    assert list(own_tempdir.iterdir()) == []


def test_a_failing_compressor_is_an_error_naming_it(tmp_path, own_tempdir):
    failing = compressors.Compressor(
        "broken", (str(_executable(tmp_path / "broken", "#!/bin/sh\necho oops >&2\nexit 4\n")),)
    )
    with pytest.raises(compressors.CompressorError, match="broken exited with code 4: oops"):
        compressors.held_out_bpc(failing, "a", "b")
    assert list(own_tempdir.iterdir()) == []


def test_missing_compressors_are_skipped_and_the_others_give_the_closed_form(tmp_path):
    fakes = tmp_path / "bin"
    fakes.mkdir()
    _executable(fakes / "xz", _IDENTITY_STREAM)  # bzip2 and zpaq are not on this PATH.
    paq8px = _executable(tmp_path / "paq8px", _IDENTITY_PAQ8PX)
    result = _run(f"--paq8px={paq8px}", "--paq8px_levels=8,8L", path=str(fakes))
    assert result.returncode == 0, result.stderr
    assert "skipped (not on PATH): bzip2, zpaq" in result.stderr
    _, test, _ = compressors.split_texts(None, None)
    assert len(test) == 84_592
    bpc = f"{8 * len(test.encode('utf-8')) / len(test):.4f}"  # More bytes than characters.
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and " s |" in line]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| xz -9e", bpc], ["| paq8px -8", bpc], ["| paq8px -8L", bpc]
    ]  # fmt: skip
    assert result.stdout.startswith("CPU: ")


@pytest.mark.parametrize(
    "args, said",
    [
        (["--paq8px=/no/such/paq8px"], "error: --paq8px=/no/such/paq8px: no such file"),
        (["--paq8px=README.md"], "error: --paq8px=README.md: not executable"),
        (["--paq8px=/bin/sh", "--paq8px_levels=max"], "error: --paq8px_levels=max: want"),
        (["--test_fraction=0"], "error: --test_fraction=0 leaves no test part"),
    ],
)
def test_bad_input_is_one_error_line_and_a_non_zero_exit(args, said):
    result = _run(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(said) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_help_works():
    result = _run("--help")
    assert result.returncode == 0 and "--paq8px PATH" in result.stdout
    assert os.path.basename(str(SCRIPT)) in result.stdout
