"""Text in, batches out: download and cache, Gutenberg stripping, vocabulary, split, batching.

Batches follow char-rnn: the training text is cut into `global_batch` contiguous streams, and
step k takes the next `seq_len` (+1 target) characters of every stream, so the LSTM state can be
carried from one step to the next. Every batch is a pure function of (seed, step), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from lstm_jax.config import DataConfig
from lstm_jax.errors import UserError

MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # A Gutenberg book is a few MB; refuse anything huge.
_START_RE = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
_END_RE = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)


# --- Getting the text -----------------------------------------------------------------------


def download(url: str, cache_dir: str | os.PathLike, *, timeout: float = 60.0) -> Path:
    """Return the cached copy of `url`, downloading it once.

    The body is written to a temporary file in the cache folder and renamed into place only when
    complete and plausibly a Gutenberg text, so an interrupted download never leaves a half file.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise UserError(f"Refusing to download {url!r}: only http(s) URLs are allowed.")
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / (Path(parsed.path).name or "download.txt")
    if target.is_file() and target.stat().st_size > 0:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=target.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as reply:
            declared = reply.headers.get("Content-Length")
            size = 0
            while chunk := reply.read(1 << 16):
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise UserError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes; not a book?")
                out.write(chunk)
            if declared is not None and size != int(declared):
                raise UserError(
                    f"Download of {url} broke off after {size} of {declared} bytes; run again, "
                    "or pass --data_path=FILE with a local copy."
                )
        with open(tmp_name, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        start = _START_RE.search(text)
        if start is None:
            raise UserError(
                f"{url} did not return a Project Gutenberg text (no '*** START OF' line); "
                "pass --data_path=FILE with a local copy."
            )
        # A reply without Content-Length ends wherever the connection dropped: only a text that
        # reaches its END line is known to be whole, so only that one is cached.
        if _END_RE.search(text, start.end()) is None:
            raise UserError(
                f"Download of {url} has no '*** END OF' line, so it was cut off; run again, "
                "or pass --data_path=FILE with a local copy."
            )
        os.replace(tmp_name, target)
        return target
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        # HTTPException: e.g. IncompleteRead when a chunked reply breaks off mid-body.
        if isinstance(e, urllib.error.HTTPError):
            e.close()  # It holds the reply's open connection.
        reason = f"HTTP {e.code} {e.reason}" if hasattr(e, "code") else getattr(e, "reason", e)
        raise UserError(
            f"Could not download {url} ({reason}); offline? Pass --data_path=FILE (a local copy)."
        ) from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """Read a text file, turning every way it can fail into one clear `UserError`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--data_path={path} does not exist; give an existing text file.")
    if path.is_dir():
        raise UserError(f"--data_path={path} is a directory; give a text file.")
    try:
        raw = path.read_bytes()
    except OSError as e:  # Permission denied, a broken disk, ...
        raise UserError(f"--data_path={path} cannot be read: {e.strerror or e}.") from None
    if not raw.strip():
        raise UserError(f"--data_path={path} is empty; give a file with text in it.")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not valid {encoding}: byte {e.object[e.start]:#04x} at offset {e.start}; "
            "pass --encoding=latin-1 (or the file's real encoding)."
        ) from None
    except LookupError:
        raise UserError(f"Unknown --encoding={encoding!r}; try utf-8 or latin-1.") from None


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Keep what lies between the Gutenberg START and END lines. Returns (body, had_markers)."""
    start = _START_RE.search(text)
    end = _END_RE.search(text, start.end() if start else 0)
    if start is None or end is None:
        return text, False
    return text[start.end() : end.start()].strip("\r\n") + "\n", True


def load_corpus(config: DataConfig) -> tuple[str, str]:
    """The text to train on (stripped, lower-cased if asked) and a note on where it came from."""
    if config.data_path:
        path = Path(config.data_path)
    else:
        path = download(config.data_url, config.data_dir)
    text = read_text(path, config.encoding)
    body, had_markers = strip_gutenberg(text)
    note = f"{path}: {len(body):,} characters"
    if not had_markers:
        note += " (no Gutenberg START/END lines; using the whole file)"
    if config.lowercase:
        body = body.lower()
    return body, note


# --- Vocabulary ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The characters of the training text, in sorted order; a character's id is its index."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary, in order of first appearance."""
        known = set(self.chars)
        return list(dict.fromkeys(c for c in text if c not in known))

    def to_json(self) -> str:
        return json.dumps(self.chars)

    @classmethod
    def from_json(cls, data: str) -> Vocab:
        return cls(json.loads(data))


# --- Split and batches ---------------------------------------------------------------------


def split(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split by position: the last `val_fraction` of the text is validation."""
    num_val = int(round(len(ids) * val_fraction))
    return ids[: len(ids) - num_val], ids[len(ids) - num_val :]


@dataclasses.dataclass(frozen=True)
class Batcher:
    """Training batches as a pure function of (seed, step).

    With `carry_state`, the training ids are cut into `global_batch` streams; within an epoch
    step k reads characters [k*seq_len, (k+1)*seq_len] of each stream (one character of overlap
    for the target). Each epoch shifts the cut by a random offset drawn from (seed, epoch), so
    epochs differ, and the carried state is reset at the start of every epoch. Without
    `carry_state`, every row is an independent window at a random position drawn from
    (seed, step).

    `rows` selects the part of the global batch that this process builds (multi-host).
    """

    train_ids: np.ndarray
    seq_len: int
    global_batch: int
    seed: int
    carry_state: bool = True

    def __post_init__(self):
        if self.steps_per_epoch < 1:
            need = self.global_batch * (self.seq_len + 1) + self.seq_len
            raise UserError(
                f"The training text has {len(self.train_ids):,} characters, too short for "
                f"{self.global_batch} streams of {self.seq_len}+1 characters (needs {need:,}); "
                "use a longer text or smaller --global_batch/--seq_len."
            )

    @property
    def stream_len(self) -> int:
        # Leave room for an offset of up to seq_len at the start of each epoch.
        return (len(self.train_ids) - self.seq_len) // self.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return (self.stream_len - 1) // self.seq_len

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def starts_new_epoch(self, step: int) -> bool:
        """True where the carried state must be reset before the step."""
        return step % self.steps_per_epoch == 0 or not self.carry_state

    def batch(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """int32 [rows, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]."""
        width = np.arange(self.seq_len + 1)
        if self.carry_state:
            epoch, position = divmod(step, self.steps_per_epoch)
            offset = np.random.default_rng([self.seed, epoch]).integers(0, self.seq_len + 1)
            stream_starts = offset + np.arange(self.global_batch) * self.stream_len
            starts = stream_starts[rows] + position * self.seq_len
        else:
            high = len(self.train_ids) - self.seq_len
            starts = np.random.default_rng([self.seed, 1 << 31, step]).integers(
                0, high, self.global_batch
            )[rows]
        return self.train_ids[starts[:, None] + width]


def eval_streams(val_ids: np.ndarray, num_streams: int, seq_len: int):
    """The whole validation text as `num_streams` contiguous streams, in chunks of `seq_len`.

    Returns (inputs, targets, weights), each [num_chunks, num_streams, seq_len]; padding has
    weight 0, so the weighted mean is exactly the mean over every predicted character.
    """
    num_targets = len(val_ids) - 1
    if num_targets < num_streams:
        raise UserError(
            f"The validation text has {len(val_ids)} characters, fewer than the {num_streams} "
            "evaluation streams; raise --val_fraction or use a longer text."
        )
    stream_len = -(-num_targets // num_streams)
    num_chunks = -(-stream_len // seq_len)
    padded = num_chunks * seq_len * num_streams
    inputs = np.zeros(padded, np.int32)
    targets = np.zeros(padded, np.int32)
    weights = np.zeros(padded, np.float32)
    inputs[:num_targets] = val_ids[:-1]
    targets[:num_targets] = val_ids[1:]
    weights[:num_targets] = 1.0

    def chunked(a):  # [streams, chunks*seq] -> [chunks, streams, seq]
        return a.reshape(num_streams, num_chunks, seq_len).transpose(1, 0, 2)

    return chunked(inputs), chunked(targets), chunked(weights)
