"""Data pipeline: Gutenberg stripping, reading, downloading, vocabulary, split and batches."""

from __future__ import annotations

import collections
import dataclasses
import http.server
import os
import socket
import threading
import typing
from pathlib import Path

import numpy as np
import pytest

from lstm_jax import corpus
from lstm_jax.config import DataConfig
from lstm_jax.data import (
    Batcher,
    Vocab,
    download,
    eval_streams,
    load_corpus,
    load_split,
    read_text,
    split,
    strip_gutenberg,
    vocab_difference,
)
from lstm_jax.errors import UsageError, UserError

BODY = "It was a dark night.\n\nThe Count smiled.\nTHE END\n"
LICENCE = (
    "Updated editions will replace the previous one.\n"
    "START: FULL LICENSE\n"
    "THE FULL PROJECT GUTENBERG LICENSE\n"
    "PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK\n"
)


def gutenberg_book(title: str = "PRIDE AND PREJUDICE", word: str = "THE", newline="\n") -> str:
    """A small book laid out like a Project Gutenberg plain-text file."""
    lines = [
        f"The Project Gutenberg eBook of {title.title()}",
        "",
        "This eBook is for the use of anyone anywhere in the United States.",
        "",
        f"*** START OF {word} PROJECT GUTENBERG EBOOK {title} ***",
        "",
        "",
        *BODY.splitlines(),
        "",
        f"*** END OF {word} PROJECT GUTENBERG EBOOK {title} ***",
        "",
        *LICENCE.splitlines(),
    ]
    return newline.join(lines) + newline


# --- Gutenberg stripping --------------------------------------------------------------------


def test_strip_gutenberg_keeps_only_the_dracula_book(gutenberg_dracula_path):
    text = read_text(gutenberg_dracula_path)
    body, had_markers = strip_gutenberg(text)
    assert had_markers
    assert "Project Gutenberg" in text[:2000]  # The file does carry the header and licence.
    assert "DRACULA" in body[:200]
    assert body.lstrip().startswith("DRACULA")
    assert "Gutenberg" not in body[:5000]
    assert "*** START" not in body and "*** END" not in body
    assert "Project Gutenberg" not in body[-2000:]
    assert "LICENSE" not in body[-2000:]
    assert "Jonathan Harker" in body
    assert len(body) > 0.9 * len(text)
    assert body.endswith("\n") and not body.endswith("\n\n")


@pytest.mark.parametrize("word", ["THE", "THIS"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_strip_gutenberg_cuts_header_and_licence_of_another_book(word, newline):
    text = gutenberg_book("PRIDE AND PREJUDICE", word=word, newline=newline)
    body, had_markers = strip_gutenberg(text)
    assert had_markers
    assert body.replace("\r\n", "\n") == BODY
    assert "Gutenberg" not in body
    assert "LICENSE" not in body
    assert "***" not in body


def test_strip_gutenberg_uses_a_file_without_markers_whole():
    text = "Just some text.\nNo markers here.\n"
    assert strip_gutenberg(text) == (text, False)


def test_strip_gutenberg_without_an_end_line_uses_the_whole_file():
    text = gutenberg_book().split("*** END")[0]
    assert strip_gutenberg(text) == (text, False)


# --- Reading files --------------------------------------------------------------------------


def test_read_text_refuses_a_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_text(tmp_path / "nope.txt")


def test_read_text_refuses_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        read_text(tmp_path)


@pytest.mark.parametrize("content", [b"", b" \n\r\n\t "])
def test_read_text_refuses_an_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is empty"):
        read_text(path)


def test_read_text_names_the_offset_of_a_non_utf8_byte(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(UserError) as info:
        read_text(path)
    message = str(info.value)
    assert "offset 3" in message
    assert "0xe9" in message
    assert "--encoding" in message


def test_read_text_decodes_latin1_when_asked(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    assert read_text(path, encoding="latin-1") == "caf\u00e9 au lait"


def test_read_text_refuses_an_unknown_encoding(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abc")
    with pytest.raises(UserError, match="--encoding"):
        read_text(path, encoding="no-such-codec")


def test_read_text_turns_an_unreadable_file_into_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("abc")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UserError, match="Permission denied"):
        read_text(path)


# --- Files checked as text ------------------------------------------------------------------


def _refused_without_opening(fifo: Path, read: typing.Callable[[], object]) -> UserError:
    """The `UserError` that `read()` raises at once; a reader that opened the FIFO instead would
    block until a writer came, so it is released with an empty write, and the test fails."""
    outcome = []

    def run():
        try:
            read()
        except UserError as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # The reader sees end-of-file.
        thread.join()
        pytest.fail(f"{fifo} was opened, and blocked until a writer came")
    assert outcome, "no UserError"
    return outcome[0]


def test_read_text_refuses_a_fifo_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    error = _refused_without_opening(fifo, lambda: read_text(fifo))
    assert str(error) == (
        f"--data_path={fifo} is a named pipe (FIFO), not a regular file; give a text file."
    )


def test_read_text_refuses_a_device_and_a_socket(tmp_path):
    with pytest.raises(UserError, match="/dev/zero is a character device, not a regular file"):
        read_text("/dev/zero")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "s.txt"))
        with pytest.raises(UserError, match="is a socket, not a regular file"):
            read_text(tmp_path / "s.txt")


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_a_fifo_in_a_folder_or_glob_is_refused_by_name_not_skipped(tmp_path, how):
    (tmp_path / "a.txt").write_text("Some text.\n")
    os.mkfifo(tmp_path / "b.txt")
    config = DataConfig(data_path=str(tmp_path) if how == "folder" else f"{tmp_path}/*.txt")
    error = _refused_without_opening(tmp_path / "b.txt", lambda: load_corpus(config))
    assert str(error).startswith(f"--data_path={tmp_path / 'b.txt'} is a named pipe (FIFO)")


def test_a_file_above_the_cap_is_refused_from_its_size_without_reading(tmp_path, monkeypatch):
    sparse = tmp_path / "huge.txt"
    with open(sparse, "wb") as f:
        f.truncate(2 << 30)  # 2 GB that take no disk: reading them would take seconds.

    def refuse(self):
        raise AssertionError("read a file that the cap refuses")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    for check in (read_text, lambda p: corpus.source_files(DataConfig(data_path=str(p)))):
        with pytest.raises(UserError) as info:
            check(sparse)
        assert str(info.value).startswith(f"--data_path={sparse} is 2,048.0 MB, above ")
        assert "--max_text_mb=1024; raise --max_text_mb" in str(info.value)


def test_the_cap_counts_the_files_of_a_folder_together(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("x" * 600_000)  # 0.57 MB each, 1.14 MB together.
    config = DataConfig(data_path=str(tmp_path), max_text_mb=1.0)
    with pytest.raises(UserError, match=r"The 2 files of --data_path hold 1\.1 MB together"):
        load_corpus(config)
    assert len(load_corpus(dataclasses.replace(config, max_text_mb=2.0))[0]) == 1_200_002


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_max_text_mb_must_be_a_positive_number(value):
    from lstm_jax.config import Config

    with pytest.raises(UsageError, match="--max_text_mb must be"):
        Config.create(max_text_mb=value).validate()


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_file_of_nul_bytes_looks_binary(tmp_path, encoding):
    path = tmp_path / "zeros.txt"
    path.write_bytes(b"\0" * 5000)
    with pytest.raises(UserError) as info:
        read_text(path, encoding)
    assert str(info.value).startswith(f"--data_path={path} looks binary, not text (it holds NUL")
    assert "\n" not in str(info.value)


def test_a_file_of_control_characters_looks_binary_but_tabs_and_form_feeds_are_text(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(1, 128)) * 40)  # No NUL; 28 of every 127 are controls.
    with pytest.raises(UserError, match="looks binary, not text .22% of its first 5,080 char"):
        read_text(binary)
    text = "Col\tumns\fpage\r\nan escape \x1b[1m here.\n" * 50
    (tmp_path / "text.txt").write_text(text, newline="")
    assert read_text(tmp_path / "text.txt") == text


BOMS = [  # (encoding that writes the byte-order mark, its name, the --encoding to pass)
    ("utf-16", "UTF-16 (little-endian)", "utf-16"),
    ("utf-16-be", "UTF-16 (big-endian)", "utf-16"),
    ("utf-32", "UTF-32 (little-endian)", "utf-32"),
    ("utf-32-be", "UTF-32 (big-endian)", "utf-32"),
]


@pytest.mark.parametrize("writer, mark, encoding", BOMS, ids=[b[0] for b in BOMS])
def test_a_utf16_or_utf32_file_names_the_encoding_to_pass_and_reads_with_it(
    tmp_path, writer, mark, encoding
):
    text = "Caf\u00e9 \u5b57 and \U0001f600.\nSecond line.\n"
    path = tmp_path / "wide.txt"
    bom = "\ufeff" if writer.endswith("-be") else ""  # utf-16/utf-32 write one of their own.
    path.write_bytes((bom + text).encode(writer))
    with pytest.raises(UserError) as info:
        read_text(path)  # Not "pass --encoding=latin-1", as when it was read as bad UTF-8.
    assert str(info.value) == (
        f"--data_path={path} starts with a {mark} byte-order mark: it is "
        f"{encoding.upper()} text; pass --encoding={encoding}."
    )
    assert read_text(path, encoding) == text


def test_a_utf16_file_trains_on_the_text_of_its_utf8_copy(tmp_path, small_text):
    (tmp_path / "wide.txt").write_bytes(small_text.encode("utf-16"))
    (tmp_path / "narrow.txt").write_text(small_text)
    wide_config = DataConfig(data_path=str(tmp_path / "wide.txt"), encoding="utf-16")
    wide_vocab, wide, _ = load_split(wide_config)
    vocab, narrow, _ = load_split(DataConfig(data_path=str(tmp_path / "narrow.txt")))
    assert wide_vocab == vocab and "\ufeff" not in vocab.chars
    for name in narrow.NAMES:
        np.testing.assert_array_equal(getattr(wide, name), getattr(narrow, name))


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "Caf\u00e9 au lait.\n".encode() * 20)
    assert read_text(path) == "Caf\u00e9 au lait.\n" * 20
    vocab, _, _ = load_split(DataConfig(data_path=str(path)))
    assert "\ufeff" not in vocab.chars and vocab == Vocab.from_text("Caf\u00e9 au lait.\n")


def test_flag_files_of_other_commands_get_the_same_checks_and_may_be_blank(tmp_path):
    from lstm_jax.cli import read_utf8_flag

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "wide.txt").write_bytes("Hi".encode("utf-16"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHi")
    (tmp_path / "blank.txt").write_text("\n")
    error = _refused_without_opening(fifo, lambda: read_utf8_flag("prompt_file", str(fifo)))
    assert str(error).startswith(f"--prompt_file={fifo} is a named pipe (FIFO)")
    with pytest.raises(UserError, match="--text=/dev/zero is a character device"):
        read_utf8_flag("text", "/dev/zero")
    with pytest.raises(UserError, match="UTF-16 text; save it as UTF-8"):
        read_utf8_flag("text", str(tmp_path / "wide.txt"))
    assert read_utf8_flag("text", str(tmp_path / "bom.txt")) == "Hi"
    assert read_utf8_flag("prompt_file", str(tmp_path / "blank.txt")) == ""


# --- load_corpus ----------------------------------------------------------------------------


def test_load_corpus_strips_and_lowercases(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(gutenberg_book())
    body, note = load_corpus(DataConfig(data_path=str(path), lowercase=True))
    assert body == BODY.lower()
    assert str(path) in note
    assert "no Gutenberg" not in note
    cased, _ = load_corpus(DataConfig(data_path=str(path)))
    assert cased == BODY


def test_load_corpus_notes_a_file_without_markers(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("Plain Text.\n")
    body, note = load_corpus(DataConfig(data_path=str(path)))
    assert body == "Plain Text.\n"
    assert "no Gutenberg START/END lines" in note


# --- Vocabulary -----------------------------------------------------------------------------


def test_vocab_round_trips_text_through_ids():
    text = "Hello, wörld!\nSecond line."
    vocab = Vocab.from_text(text)
    assert vocab.chars == "".join(sorted(set(text)))
    assert vocab.size == len(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() < vocab.size
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.reshape(1, -1)) == text


def test_vocab_survives_json():
    vocab = Vocab.from_text('quotes " and \\ and \n newline, é, 字')
    again = Vocab.from_json(vocab.to_json())
    assert again == vocab
    assert again.chars == vocab.chars


def test_vocab_unknown_lists_unseen_chars_in_order_of_first_appearance():
    vocab = Vocab.from_text("abc ")
    assert vocab.unknown("a zebra crossed by xylophone") == list("zerosdyxlphn")
    assert vocab.unknown("cab") == []


def test_vocab_difference_names_the_characters_only_in_each():
    assert vocab_difference("\n abc\u00e9", "\n abZ") == (
        "'c', '\u00e9' only in the saved run; 'Z' only in this text"
    )
    assert vocab_difference("ab", "ab\t ") == "'\\t', ' ' only in this text"
    assert vocab_difference("ab", "ba") == "the same characters in another order (so other ids)"
    many = "".join(chr(c) for c in range(0x100, 0x119))  # 25 characters.
    assert vocab_difference(many, "a", "the checkpoint", "the text") == (
        ", ".join(repr(c) for c in many[:20]) + " and 5 more only in the checkpoint; "
        "'a' only in the text"
    )


# --- Split ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, val_fraction, test_fraction",
    [(1000, 0.1, 0.0), (1001, 0.1, 0.1), (999, 0.05, 0.1), (997, 0.25, 0.3), (10, 0.5, 0.2)],
)
def test_split_is_train_then_validation_then_test_without_overlap(
    length, val_fraction, test_fraction
):
    ids = np.arange(length)
    parts = split(ids, val_fraction, test_fraction)
    assert len(parts.val) == round(length * val_fraction)
    assert len(parts.test) == round(length * test_fraction)
    np.testing.assert_array_equal(np.concatenate([parts.train, parts.val, parts.test]), ids)
    np.testing.assert_array_equal(parts.test, ids[length - len(parts.test) :])


# --- Batcher --------------------------------------------------------------------------------

SEQ, STREAMS = 16, 8
POSITIONS = np.arange(10_000, dtype=np.int32)  # Each id is its own position in the text.


def batcher(ids=POSITIONS, **kw) -> Batcher:
    settings = dict(seq_len=SEQ, global_batch=STREAMS, seed=3)
    return Batcher(ids, **{**settings, **kw})


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = batcher(), batcher()
    for step in (0, 1, 7, a.steps_per_epoch, 5 * a.steps_per_epoch + 2):
        first = a.batch(step)
        assert first.shape == (STREAMS, SEQ + 1)
        np.testing.assert_array_equal(first, a.batch(step))
        np.testing.assert_array_equal(first, b.batch(step))
    other_seed = batcher(seed=4)
    epoch_starts = [e * a.steps_per_epoch for e in range(5)]
    assert any(not np.array_equal(a.batch(s), other_seed.batch(s)) for s in epoch_starts)


def test_each_stream_continues_where_the_previous_step_stopped():
    b = batcher()
    for epoch in range(3):
        first = epoch * b.steps_per_epoch
        for step in range(first, first + b.steps_per_epoch - 1):
            now, after = b.batch(step), b.batch(step + 1)
            np.testing.assert_array_equal(now[:, -1], after[:, 0])
            np.testing.assert_array_equal(np.diff(now, axis=1), 1)  # Rows are contiguous text.


def test_streams_of_an_epoch_never_read_the_same_character_twice():
    b = batcher()
    inputs = np.concatenate([b.batch(step)[:, :-1].ravel() for step in range(b.steps_per_epoch)])
    assert len(np.unique(inputs)) == len(inputs)
    assert len(inputs) > 0.95 * len(POSITIONS)  # And they cover nearly all of the text.


def test_epochs_start_at_different_offsets():
    b = batcher()
    offsets = {int(b.batch(epoch * b.steps_per_epoch)[0, 0]) for epoch in range(12)}
    assert len(offsets) > 1
    assert all(0 <= offset <= SEQ for offset in offsets)
    assert b.epoch_of(b.steps_per_epoch - 1) == 0 and b.epoch_of(b.steps_per_epoch) == 1


def test_starts_new_epoch_only_at_epoch_boundaries():
    b = batcher()
    n = b.steps_per_epoch
    assert [b.starts_new_epoch(s) for s in (0, 1, n - 1, n, n + 1, 2 * n)] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    independent = batcher(carry_state=False)
    assert all(independent.starts_new_epoch(s) for s in range(5))


@pytest.mark.parametrize("carry_state", [True, False])
def test_rows_selects_the_same_rows_of_the_global_batch(carry_state):
    b = batcher(carry_state=carry_state)
    for step in (0, 9, b.steps_per_epoch + 1):
        full = b.batch(step)
        np.testing.assert_array_equal(b.batch(step, rows=slice(2, 5)), full[2:5])
        np.testing.assert_array_equal(b.batch(step, rows=slice(0, 4)), full[:4])
        np.testing.assert_array_equal(b.batch(step, rows=slice(4, 8)), full[4:])


def test_without_carry_state_windows_are_independent_but_reproducible():
    b = batcher(carry_state=False)
    batches = [b.batch(step) for step in range(20)]
    for step, batch in enumerate(batches):
        np.testing.assert_array_equal(batch, batcher(carry_state=False).batch(step))
        np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
    assert len({batch.tobytes() for batch in batches}) == len(batches)
    starts = np.concatenate([batch[:, 0] for batch in batches])
    assert len(np.unique(starts)) > len(starts) // 2  # Random, not a fixed cut.


@pytest.mark.parametrize("carry_state", [True, False])
def test_every_step_stays_inside_the_text(carry_state):
    need = STREAMS * (SEQ + 1) + SEQ
    for length in range(need, need + 3 * STREAMS * SEQ, 7):
        ids = np.arange(length, dtype=np.int32)
        for seed in range(4):
            b = Batcher(ids, SEQ, STREAMS, seed, carry_state)
            for epoch in range(3):
                for step in (epoch * b.steps_per_epoch, (epoch + 1) * b.steps_per_epoch - 1):
                    assert b.batch(step).max() < length


def test_a_text_too_short_for_the_batch_is_a_user_error():
    need = STREAMS * (SEQ + 1) + SEQ
    assert batcher(np.arange(need)).steps_per_epoch == 1  # The message's count is exact.
    with pytest.raises(UserError, match="--global_batch") as info:
        batcher(np.arange(need - 1))
    assert f"needs {need:,}" in str(info.value)


# --- Evaluation streams ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, streams, seq_len", [(1003, 4, 16), (1000, 7, 10), (50, 49, 3), (333, 1, 400)]
)
def test_eval_streams_cover_the_validation_text_exactly_once(length, streams, seq_len):
    val = np.arange(1000, 1000 + length, dtype=np.int32)
    inputs, targets, weights = eval_streams(val, streams, seq_len)
    assert inputs.shape == targets.shape == weights.shape
    assert inputs.shape[1:] == (streams, seq_len)
    assert weights.sum() == length - 1

    def in_stream_order(a):  # [chunks, streams, seq] -> each stream read start to end.
        return a.transpose(1, 0, 2).reshape(-1)

    real = in_stream_order(weights) == 1
    assert set(np.unique(weights).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(in_stream_order(targets)[real], val[1:])
    np.testing.assert_array_equal(in_stream_order(inputs)[real], val[:-1])


def test_eval_streams_refuses_fewer_targets_than_streams():
    with pytest.raises(UserError, match="--val_fraction"):
        eval_streams(np.arange(8), 8, 4)


# --- Download against a local HTTP server ---------------------------------------------------

BOOK = gutenberg_book("DRACULA").encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: collections.Counter  # Set on the subclass made per server.

    def log_message(self, *args):  # Keep pytest output clean.
        pass

    def do_GET(self):
        self.requests[self.path] += 1
        if self.path in ("/book.txt", "/cache/epub/1342/pg1342.txt"):
            self._reply(BOOK)
        elif self.path == "/missing.txt":
            self.send_error(404, "Not Found")
        elif self.path == "/cut.txt":  # Promises more than it sends, then hangs up.
            self.send_response(200)
            self.send_header("Content-Length", str(len(BOOK) + 5000))
            self.end_headers()
            self.wfile.write(BOOK)  # Only the Content-Length shows that something is missing.
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/cut-chunked.txt":  # Chunked, hangs up before the final 0 chunk.
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(BOOK):x}\r\n".encode() + BOOK + b"\r\n")
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/cut-unsized.txt":  # No length at all: the end is the hang-up.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BOOK.split(b"*** END")[0][:-40])
            self.close_connection = True
        elif self.path == "/page.html":
            self._reply(b"<html><body>Welcome! Please log in.</body></html>")
        else:
            self.send_error(500)

    def _reply(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(typing.NamedTuple):
    url: str
    requests: collections.Counter  # Requests per path.
    hung_up: threading.Semaphore  # Released each time the server has closed a connection.


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1, shut down after the test."""
    requests = collections.Counter()
    hung_up = threading.Semaphore(0)

    class HTTPServer(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def shutdown_request(self, request):
            super().shutdown_request(request)
            hung_up.release()

    httpd = HTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"requests": requests}))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", requests, hung_up)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_writes_the_served_book_to_the_cache(server, tmp_path):
    base, requests = server.url, server.requests
    path = download(f"{base}/book.txt", tmp_path / "cache", timeout=5)
    assert path == tmp_path / "cache" / "book.txt"
    assert path.read_bytes() == BOOK
    assert requests["/book.txt"] == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["book.txt"]


def test_download_reuses_the_cached_copy_without_a_request(server, tmp_path):
    base, requests = server.url, server.requests
    first = download(f"{base}/book.txt", tmp_path, timeout=5)
    second = download(f"{base}/book.txt", tmp_path, timeout=5)
    assert first == second
    assert second.read_bytes() == BOOK
    assert requests["/book.txt"] == 1


def _open_sockets() -> int:
    """How many sockets this process has open (Linux; 0 elsewhere)."""
    if not os.path.isdir("/proc/self/fd"):
        return 0
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # Closed meanwhile (e.g. the listdir handle itself).
            pass
    return count


def test_download_of_a_missing_page_is_a_user_error(server, tmp_path):
    base, requests = server.url, server.requests
    open_before = _open_sockets()
    with pytest.raises(UserError, match="--data_path") as info:
        download(f"{base}/missing.txt", tmp_path / "cache", timeout=5)
    assert "404" in str(info.value)
    assert requests["/missing.txt"] == 1
    assert server.hung_up.acquire(timeout=5)  # The server's end of the connection is closed,
    assert _open_sockets() <= open_before  # and so is ours: no socket leaks.
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("path", ["/cut.txt", "/cut-chunked.txt", "/cut-unsized.txt"])
def test_a_download_cut_off_mid_body_leaves_no_file(server, tmp_path, path):
    base, requests = server.url, server.requests
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="--data_path"):
        download(f"{base}{path}", cache, timeout=5)
    assert requests[path] == 1
    assert list(cache.iterdir()) == []  # Neither the book nor a .part file.


def test_download_refuses_a_reply_that_is_not_a_gutenberg_text(server, tmp_path):
    base, requests = server.url, server.requests
    with pytest.raises(UserError, match="Project Gutenberg"):
        download(f"{base}/page.html", tmp_path, timeout=5)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError):  # Not cached: the next call asks again.
        download(f"{base}/page.html", tmp_path, timeout=5)
    assert requests["/page.html"] == 2


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/book.txt", "book.txt"])
def test_download_refuses_urls_that_are_not_http(url, tmp_path):
    with pytest.raises(UserError, match="only http"):
        download(url, tmp_path / "cache", timeout=1)
    assert not (tmp_path / "cache").exists()


def test_download_with_nothing_listening_is_a_user_error(tmp_path):
    with socket.socket() as sock:  # Bound but not listening: connections are refused.
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(UserError, match="--data_path"):
            download(f"http://127.0.0.1:{port}/book.txt", tmp_path / "cache", timeout=2)
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_corpus_downloads_when_no_path_is_given(server, tmp_path):
    base, requests = server.url, server.requests
    config = DataConfig(data_url=f"{base}/book.txt", data_dir=str(tmp_path / "cache"))
    body, note = load_corpus(config)
    assert body == BODY
    assert "book.txt" in note
    load_corpus(config)
    assert requests["/book.txt"] == 1


# --- --gutenberg=ID, against the same server ------------------------------------------------


def test_gutenberg_numbers_name_the_plain_text_files_of_gutenberg_org():
    assert corpus.GUTENBERG_URL.format(id=1342) == (
        "https://www.gutenberg.org/cache/epub/1342/pg1342.txt"
    )


@pytest.fixture
def gutenberg_here(server, monkeypatch):
    """--gutenberg=ID downloads from the local server (same layout as www.gutenberg.org)."""
    monkeypatch.setattr(corpus, "GUTENBERG_URL", f"{server.url}/cache/epub/{{id}}/pg{{id}}.txt")
    return server


def test_gutenberg_downloads_the_book_of_that_number_once(gutenberg_here, tmp_path):
    requests = gutenberg_here.requests
    config = DataConfig(gutenberg=1342, data_dir=str(tmp_path / "cache"))
    body, note = load_corpus(config)
    assert body == BODY
    assert "pg1342.txt" in note
    assert (tmp_path / "cache" / "pg1342.txt").read_bytes() == BOOK
    assert load_corpus(config)[0] == BODY  # From the cache:
    assert requests["/cache/epub/1342/pg1342.txt"] == 1


def test_gutenberg_of_a_missing_book_is_a_user_error_and_caches_nothing(gutenberg_here, tmp_path):
    with pytest.raises(UserError, match="HTTP 500") as info:
        load_corpus(DataConfig(gutenberg=99, data_dir=str(tmp_path)))
    assert "/cache/epub/99/pg99.txt" in str(info.value) and "--data_path" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_data_path_wins_over_gutenberg_which_wins_over_data_url(gutenberg_here, tmp_path):
    requests = gutenberg_here.requests
    local = tmp_path / "mine.txt"
    local.write_text("My own text.\n")
    url = f"{gutenberg_here.url}/missing.txt"
    both = DataConfig(data_path=str(local), gutenberg=1342, data_url=url, data_dir=str(tmp_path))
    assert load_corpus(both)[0] == "My own text.\n"
    assert sum(requests.values()) == 0
    assert load_corpus(dataclasses.replace(both, data_path=""))[0] == BODY
    assert requests["/missing.txt"] == 0


def test_gutenberg_refuses_a_negative_number(tmp_path):
    with pytest.raises(UsageError, match="--gutenberg must be a book number"):
        load_corpus(DataConfig(gutenberg=-5, data_dir=str(tmp_path)))
