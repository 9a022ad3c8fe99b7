"""Text to ids to batches: vocabulary, split, batching. The text comes from `lstm_jax.corpus`.

The split is by position: the last `test_fraction` of the text is the test part, the
`val_fraction` just before it validation, the rest training. Several documents (the files of a
folder or a glob) each give their own shares (`split_documents`): validation and test then
sample every document, not only the last in sorted order.

Batches follow char-rnn: the training text is cut into `global_batch` contiguous streams, and
step k takes the next `seq_len` (+1 target) characters of every stream, so the LSTM state can be
carried from one step to the next. Every batch is a pure function of (seed, step), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import jax
import numpy as np

from lstm_jax.config import DataConfig
from lstm_jax.corpus import (  # noqa: F401 - re-exported: data was their home before corpus.
    SEPARATOR,
    download,
    load_corpus,
    load_documents,
    read_text,
    strip_gutenberg,
)
from lstm_jax.errors import UsageError, UserError


@dataclasses.dataclass(frozen=True)
class Split:
    """A text's ids cut by position: training, then validation, then test (possibly empty)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    NAMES = ("train", "val", "test")


def load_split(
    config: DataConfig, make_vocab: Callable[[str], Vocab] | None = None
) -> tuple[Vocab, Split, str]:
    """The vocabulary of the whole text (`make_vocab(text)`, by default its sorted characters;
    fine-tuning passes its own), the training / validation / test ids, and the note."""
    documents, note = load_documents(config)
    vocab = (make_vocab or Vocab.from_text)(SEPARATOR.join(documents))
    separator = vocab.encode(SEPARATOR) if len(documents) > 1 else None
    ids = [vocab.encode(document) for document in documents]
    return vocab, split_documents(ids, config.val_fraction, config.test_fraction, separator), note


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
        """int32 ids: a table lookup over the text's code points, not a loop per character.

        A character outside the vocabulary raises KeyError.
        """
        codes = _code_points(self.chars)
        table = np.full(int(codes.max(initial=0)) + 2, -1, np.int32)  # Clipped to: unknown.
        table[codes] = np.arange(len(codes), dtype=np.int32)
        ids = np.empty(len(text), np.int32)
        for start in range(0, len(text), _ENCODE_CHUNK):
            chunk = _code_points(text[start : start + _ENCODE_CHUNK])
            table.take(chunk, mode="clip", out=ids[start : start + len(chunk)])
        if len(ids) and ids.min() < 0:
            raise KeyError(text[int(np.argmax(ids < 0))])
        return ids

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


_ENCODE_CHUNK = 1 << 24  # Characters encoded at a time: at most 64 MB of UTF-32 in flight.
MAX_SHOWN_CHARS = 20  # Characters named one by one in a message; the rest are counted.


def shown_chars(chars: str | list[str], limit: int = MAX_SHOWN_CHARS) -> str:
    """Characters for a message, each quoted and escaped (' ', '\\n', '\\x00' stay visible),
    the first `limit` named and the rest counted."""
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def vocab_difference(
    saved: str, current: str, saved_as: str = "the saved run", current_as: str = "this text"
) -> str:
    """How two vocabularies' characters differ, named one by one: "'é', 'Z' only in the
    saved run; '\\n' only in this text"; or that only their order does (ids differ)."""
    saved_set, current_set = set(saved), set(current)
    only_saved = [c for c in saved if c not in current_set]
    only_current = [c for c in current if c not in saved_set]
    parts = [
        f"{shown_chars(chars)} only in {where}"
        for chars, where in ((only_saved, saved_as), (only_current, current_as))
        if chars
    ]
    return "; ".join(parts) or "the same characters in another order (so other ids)"


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


# --- Split and batches ---------------------------------------------------------------------


def split(ids: np.ndarray, val_fraction: float, test_fraction: float = 0.0) -> Split:
    """Split by position: the last `test_fraction` of the text is the test part, the
    `val_fraction` before it validation, the rest training (each share rounded to characters)."""
    num_test = int(round(len(ids) * test_fraction))
    num_val = int(round(len(ids) * val_fraction))
    val_start, test_start = len(ids) - num_test - num_val, len(ids) - num_test
    return Split(ids[:val_start], ids[val_start:test_start], ids[test_start:])


def split_documents(
    documents: list[np.ndarray],
    val_fraction: float,
    test_fraction: float = 0.0,
    separator: np.ndarray | None = None,
) -> Split:
    """Split each document by position (`split`) and join the training parts, the validation
    parts and the test parts, with `separator` between the parts of each."""
    parts = [split(ids, val_fraction, test_fraction) for ids in documents]
    joined = [_joined([getattr(p, name) for p in parts], separator) for name in Split.NAMES]
    return Split(*joined)


def _joined(parts: list[np.ndarray], separator: np.ndarray | None) -> np.ndarray:
    parts = [part for part in parts if len(part)]
    if len(parts) == 1:
        return parts[0]
    pieces = []
    for part in parts:
        pieces += [separator, part] if pieces else [part]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


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


# --- One run's data ------------------------------------------------------------------------


@dataclasses.dataclass
class RunData:
    """The text, cut for one training run and this process."""

    vocab: Vocab
    split: Split
    batcher: Batcher
    rows: slice  # This process's rows of every global batch.
    eval_streams: tuple[np.ndarray, np.ndarray, np.ndarray]  # Validation, this process's rows.
    note: str


def load_run_data(
    config: DataConfig, make_vocab: Callable[[str], Vocab] | None = None
) -> RunData:
    """The corpus, its vocabulary, the split, the batcher and this process's validation rows."""
    vocab, split_ids, note = load_split(config, make_vocab)
    batcher = Batcher(
        split_ids.train, config.seq_len, config.global_batch, config.seed, config.carry_state
    )
    if len(split_ids.val) <= config.seq_len:
        raise UsageError(
            f"--seq_len={config.seq_len} is longer than the validation text "
            f"({len(split_ids.val)} characters); lower --seq_len or raise --val_fraction."
        )
    process_rows = config.global_batch // jax.process_count()
    rows = slice(jax.process_index() * process_rows, (jax.process_index() + 1) * process_rows)
    streams = eval_streams(split_ids.val, config.global_batch, config.seq_len)
    return RunData(vocab, split_ids, batcher, rows, tuple(a[:, rows] for a in streams), note)
