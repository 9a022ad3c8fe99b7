"""Your own text, and an offline first run: the bundled Dracula, files, folders and globs, the
split of several documents, the vectorised encoder, and the command line on each new input."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import socket
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from subprocesses import ROOT, run_module

from lstm_jax import books, corpus, data
from lstm_jax.config import DataConfig
from lstm_jax.data import Vocab, load_corpus, load_documents, load_split
from lstm_jax.errors import UserError

# The body of Project Gutenberg #345 between its START and END lines, as strip_gutenberg cuts it.
DRACULA_SHA256 = "2635b9382f91c01395b822cce6ba622389b2882855c6029f9cb4eb19b5a421db"
DRACULA_CHARS = 845_922
BUNDLED = Path(books.__file__).with_name(books.DRACULA_FILE)


# --- The bundled book -------------------------------------------------------------------------


def test_the_bundled_dracula_is_the_checked_body():
    assert 200_000 < BUNDLED.stat().st_size < 350_000  # xz-compressed, about 270 kB.
    body = books.dracula()
    assert hashlib.sha256(body.encode("utf-8")).hexdigest() == DRACULA_SHA256
    assert books.DRACULA_SHA256 == DRACULA_SHA256
    assert len(body) == DRACULA_CHARS and len(set(body)) == 96
    assert body.lstrip().startswith("DRACULA") and "Gutenberg" not in body
    assert body.endswith("\n") and not body.endswith("\n\n")


def test_the_bundled_body_is_what_the_gutenberg_file_trains_on(gutenberg_dracula_path):
    raw = gutenberg_dracula_path.read_text(encoding="utf-8")
    assert "*** START OF THE PROJECT GUTENBERG EBOOK" in raw  # The raw file, licence and all.
    assert load_corpus(DataConfig(data_path=str(gutenberg_dracula_path)))[0] == books.dracula()


def test_a_damaged_bundled_book_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setattr(books, "DRACULA_SHA256", "0" * 64)
    with pytest.raises(UserError, match="damaged") as info:
        load_corpus(DataConfig())
    assert "\n" not in str(info.value) and "--data_path" in str(info.value)
    monkeypatch.setattr(books, "DRACULA_FILE", "missing.txt.xz")
    with pytest.raises(UserError, match="cannot be read"):
        books.dracula()


def test_a_corrupt_bundled_file_is_a_user_error(monkeypatch, tmp_path):
    broken = bytearray(BUNDLED.read_bytes())
    broken[len(broken) // 2] ^= 0xFF
    (tmp_path / books.DRACULA_FILE).write_bytes(bytes(broken))
    monkeypatch.setattr(books.importlib.resources, "files", lambda _: tmp_path)
    with pytest.raises(UserError, match="cannot be read"):
        books.dracula()


def test_no_path_trains_on_the_bundled_book_with_no_network(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise AssertionError("the default corpus touched the network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    config = DataConfig(data_dir=str(tmp_path / "cache"))
    body, note = load_corpus(config)
    assert body == books.dracula()
    assert (
        note
        == f"Dracula (Project Gutenberg #345, bundled with lstm_jax): {DRACULA_CHARS:,} characters"
    )
    assert not (tmp_path / "cache").exists()
    _, parts, _ = load_split(config)
    # The test part is the validation text of every run before --test_fraction.
    assert len(parts.test) == 84_592 and len(parts.val) == 42_296
    assert len(parts.train) == DRACULA_CHARS - 84_592 - 42_296


def test_every_wheel_ships_the_bundled_book():
    # Without package data, setuptools leaves the .xz out of a (non-editable) wheel.
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = settings["package-data"]["lstm_jax.books"]
    assert any(fnmatch.fnmatch(books.DRACULA_FILE, p) for p in patterns)


# --- Files, folders and globs -----------------------------------------------------------------


def _files(folder: Path, texts: dict[str, str | bytes]) -> Path:
    for name, text in texts.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def test_a_folder_gives_its_txt_files_sorted_and_nothing_else(tmp_path):
    folder = _files(tmp_path / "texts", {"b.txt": "B", "a.txt": "A", "c.md": "C", "sub/d.txt": "D"})
    assert corpus.find_files(str(folder)) == [folder / "a.txt", folder / "b.txt"]
    assert corpus.find_files(str(folder / "b.txt")) == [folder / "b.txt"]


def test_a_glob_gives_its_files_sorted_recursively(tmp_path):
    folder = _files(tmp_path, {"x/b.txt": "B", "x/a.txt": "A", "x/sub/c.txt": "C", "y.txt": "Y"})
    assert corpus.find_files(f"{tmp_path}/x/**/*.txt") == [
        folder / "x/a.txt",
        folder / "x/b.txt",
        folder / "x/sub/c.txt",
    ]
    odd = _files(tmp_path, {"book [1].txt": "odd"}) / "book [1].txt"  # A real name, not a glob.
    assert corpus.find_files(str(odd)) == [odd]


@pytest.mark.parametrize(
    "where, phrase",
    [
        ("missing/", "does not exist; give a text file, a folder of .txt files or a glob"),
        ("empty", "is a folder with no .txt files"),
        ("texts/*.md", "matches no file"),
    ],
)
def test_a_path_that_names_no_text_is_a_user_error(tmp_path, where, phrase):
    _files(tmp_path, {"texts/a.txt": "A"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=re.escape(phrase)) as info:
        load_corpus(DataConfig(data_path=f"{tmp_path}/{where}"))
    assert "\n" not in str(info.value)


def test_documents_are_stripped_joined_and_counted_file_by_file(tmp_path):
    book = "Header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nThe body.\n*** END OF THE "
    folder = _files(
        tmp_path, {"1.txt": "First file.\n", "2.txt": book + "PROJECT GUTENBERG EBOOK X ***\n"}
    )
    documents, note = load_documents(DataConfig(data_path=str(folder), lowercase=True))
    assert documents == ["first file.\n", "the body.\n"]
    assert load_corpus(DataConfig(data_path=str(folder)))[0] == "First file.\n\n\nThe body.\n"
    assert f"2 files joined by two newlines, {12 + 2 + 10} characters" in note
    assert f"{folder / '1.txt'}: 12; {folder / '2.txt'}: 10" in note
    assert "cut from 1" in note


def test_the_note_names_the_first_files_and_counts_the_rest(tmp_path):
    folder = _files(tmp_path, {f"{i:02}.txt": "x" * i for i in range(1, 26)})
    _, note = load_documents(DataConfig(data_path=str(folder)))
    assert f"{folder / '20.txt'}: 20; and 5 more" in note and "21.txt" not in note


def test_an_encoding_error_names_the_file_and_the_offset(tmp_path):
    folder = _files(tmp_path, {"a.txt": "Fine.\n", "b.txt": "caf\u00e9".encode("latin-1")})
    with pytest.raises(UserError) as info:
        load_corpus(DataConfig(data_path=str(folder)))
    assert str(folder / "b.txt") in str(info.value) and "offset 3" in str(info.value)


# --- The split of several documents -----------------------------------------------------------


def test_each_document_gives_its_own_last_fractions_to_validation_and_test(tmp_path):
    first, second = "abcdefghij" * 10, "ABCDEFGHIJ" * 30  # 100 and 300 characters.
    folder = _files(tmp_path, {"1.txt": first, "2.txt": second})
    config = DataConfig(data_path=str(folder), val_fraction=0.1, test_fraction=0.2)
    vocab, parts, _ = load_split(config)
    assert vocab == Vocab.from_text(first + "\n\n" + second)
    assert vocab.decode(parts.train) == first[:70] + "\n\n" + second[:210]
    assert vocab.decode(parts.val) == first[70:80] + "\n\n" + second[210:240]
    assert vocab.decode(parts.test) == first[80:] + "\n\n" + second[240:]


def test_one_document_splits_by_position(small_text, small_text_path):
    vocab, parts, _ = load_split(DataConfig(data_path=str(small_text_path)))
    assert vocab == Vocab.from_text(small_text)
    ids, n = vocab.encode(small_text), len(small_text)
    num_test, num_val = round(0.1 * n), round(0.05 * n)
    np.testing.assert_array_equal(parts.test, ids[n - num_test :])
    np.testing.assert_array_equal(parts.val, ids[n - num_test - num_val : n - num_test])
    np.testing.assert_array_equal(parts.train, ids[: n - num_test - num_val])


def test_documents_too_short_to_give_validation_give_none():
    sep = np.array([-1])
    parts = data.split_documents([np.arange(3), np.arange(10, 40)], 0.1, separator=sep)
    np.testing.assert_array_equal(parts.train, [0, 1, 2, -1, *range(10, 37)])
    np.testing.assert_array_equal(parts.val, [37, 38, 39])  # The first gave nothing: no separator.
    assert len(parts.test) == 0


# --- Encoding ---------------------------------------------------------------------------------


def _encode_by_dict(vocab: Vocab, text: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(vocab.chars)}
    return np.array([index[c] for c in text], np.int32)


def test_encode_matches_a_lookup_per_character(monkeypatch):
    rng = np.random.default_rng(0)
    alphabet = list("ab\n \t\u00e9\u00df\u5b57\u2603") + ["\U0001f600", "\x00", "\ud800"]
    text = "".join(rng.choice(alphabet, 5000))
    vocab = Vocab.from_text(text)
    monkeypatch.setattr(data, "_ENCODE_CHUNK", 333)  # Chunks that cut the text unevenly.
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    np.testing.assert_array_equal(ids, _encode_by_dict(vocab, text))
    unsorted = Vocab("zyx\u5b57a")
    np.testing.assert_array_equal(unsorted.encode("a\u5b57xz"), [4, 3, 2, 0])
    assert vocab.encode("").shape == (0,)


@pytest.mark.parametrize("text", ["abq", "q", "ab\U0001f601", "ab\u00e0"])
def test_encode_refuses_a_character_outside_the_vocabulary(text):
    with pytest.raises(KeyError):
        Vocab("abc\u00e9").encode(text)


class _NoCharacterLoop(str):
    """A text that refuses to be read one character at a time from Python."""

    def __iter__(self):
        raise AssertionError("encode loops over the text in Python")

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise AssertionError("encode reads the text one character at a time")
        return str.__getitem__(self, key)


def test_encode_is_not_a_python_loop_per_character(monkeypatch):
    text = "It was a dark night, said the Count.\n" * 1000
    vocab = Vocab.from_text(text)
    monkeypatch.setattr(data, "_ENCODE_CHUNK", 10_000)
    np.testing.assert_array_equal(vocab.encode(_NoCharacterLoop(text)), vocab.encode(text))


# --- The command line on each new input --------------------------------------------------------


def _main(text_path: str, workdir: Path, *extra: str, timeout: float = 300):
    return run_module(
        "lstm_jax.main",
        f"--data_path={text_path}",
        f"--workdir={workdir}",
        "--embed_dim=8", "--hidden=16", "--seq_len=16", "--global_batch=8", "--num_steps=4",
        "--warmup_steps=1", "--log_every=1000", "--eval_every=1000", "--checkpoint_every=1000",
        "--length=10",
        *extra,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize(
    "where, phrase",
    [
        ("missing_folder/", "does not exist; give a text file, a folder of .txt files or a glob"),
        ("empty_folder", "is a folder with no .txt files; add some"),
        ("notes/*.txt", "matches no file; fix the pattern"),
    ],
    ids=["missing folder", "empty folder", "glob matching nothing"],
)
def test_a_bad_data_path_is_one_error_line_and_writes_nothing(tmp_path, where, phrase):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "notes").mkdir()
    result = _main(f"{tmp_path}/{where}", tmp_path / "run")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error", "FATAL"))]
    assert len(errors) == 1 and errors[0].startswith("error: --data_path=") and phrase in errors[0]
    assert not (tmp_path / "run").exists()


def _make_input(tmp_path: Path, kind: str) -> str:
    """A --data_path that is not a usable text, of the given kind; returns the flag's value."""
    path = tmp_path / "input.txt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "fifo in a folder":
        (tmp_path / "texts").mkdir()
        (tmp_path / "texts/a.txt").write_text("Some text.\n" * 100)
        os.mkfifo(tmp_path / "texts/b.txt")
        return str(tmp_path / "texts")
    elif kind == "device":
        return "/dev/zero"
    elif kind == "sparse 2 GB":
        with open(path, "wb") as f:
            f.truncate(2 << 30)
    elif kind == "NUL bytes":
        path.write_bytes(b"\0" * 10_000)
    elif kind == "UTF-16":
        path.write_bytes(("A small text. " * 200).encode("utf-16"))
    return str(path)


UNREADABLE_INPUTS = [
    # (kind, a phrase of the one error line, whether its stat tells: refused before any write)
    ("fifo", "input.txt is a named pipe (FIFO), not a regular file; give a text file.", True),
    ("fifo in a folder", "texts/b.txt is a named pipe (FIFO), not a regular file", True),
    ("device", "--data_path=/dev/zero is a character device, not a regular file", True),
    ("sparse 2 GB", "input.txt is 2,048.0 MB, above --max_text_mb=1024; raise --max_text_mb", True),
    ("NUL bytes", "input.txt looks binary, not text (it holds NUL characters)", False),
    ("UTF-16", "input.txt starts with a UTF-16 (little-endian) byte-order mark: it is UTF-16 "
     "text; pass --encoding=utf-16.", False),
]  # fmt: skip


@pytest.mark.parametrize(
    "kind, phrase, from_stat", UNREADABLE_INPUTS, ids=[u[0] for u in UNREADABLE_INPUTS]
)
def test_input_that_is_not_text_is_refused_at_once_in_one_line(tmp_path, kind, phrase, from_stat):
    # A FIFO opened would hang until the timeout; /dev/zero or the sparse file read would take
    # seconds and gigabytes: each is refused from its stat, before a workdir is made. The text's
    # content is checked where it is read, before the first step.
    started = time.monotonic()
    result = _main(_make_input(tmp_path, kind), tmp_path / "run", timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error", "FATAL"))]
    assert len(errors) == 1 and errors[0].startswith("error: --data_path="), result.stderr[-2000:]
    assert phrase in errors[0]
    assert not (tmp_path / ("run" if from_stat else "run/checkpoints")).exists()
    assert time.monotonic() - started < 60  # Python and JAX starting, on a busy machine.


def test_a_folder_of_two_files_trains_end_to_end_with_counts_per_file(tmp_path, small_text):
    half = len(small_text) // 2
    folder = _files(
        tmp_path / "texts", {"one.txt": small_text[:half], "two.txt": small_text[half:]}
    )
    result = _main(str(folder), tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = len(small_text[:half]), len(small_text[half:])
    assert (
        f"2 files joined by two newlines, {one + 2 + two:,} characters ({folder / 'one.txt'}: "
        f"{one:,}; {folder / 'two.txt'}: {two:,};"
    ) in result.stderr
    val = round(one * 0.05) + 2 + round(two * 0.05)
    test = round(one * 0.1) + 2 + round(two * 0.1)
    assert f"validation {val:,} / test {test:,} characters" in result.stderr
    assert "Finished 4 steps; sample:" in result.stderr


def test_a_utf16_file_trains_with_its_encoding_passed(tmp_path, small_text):
    path = tmp_path / "wide.txt"
    path.write_bytes(small_text.encode("utf-16"))  # With its byte-order mark.
    result = _main(str(path), tmp_path / "run", "--encoding=utf-16")
    assert result.returncode == 0, result.stderr[-3000:]
    note = f"{path}: {len(small_text):,} characters (no Gutenberg START/END lines"
    assert note in result.stderr  # Every character decoded, the mark not among them.
    assert f"vocabulary {len(set(small_text))};" in result.stderr
    assert "Finished 4 steps; sample:" in result.stderr
