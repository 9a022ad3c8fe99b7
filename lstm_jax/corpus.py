"""Text in: the bundled book, files, folders and globs, downloads, Gutenberg stripping.

`--data_path` names a file, a folder (its *.txt files) or a glob; `--gutenberg=ID` and
`--data_url` download a Project Gutenberg book once into a cache; with none of them the run reads
Dracula, which ships with the package (`lstm_jax.books`), so a first run needs no network.
Several documents are joined with `SEPARATOR`; `lstm_jax.data` splits and encodes them.
"""

from __future__ import annotations

import glob
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from lstm_jax import books
from lstm_jax.config import DataConfig
from lstm_jax.errors import UsageError, UserError
from lstm_jax.textfile import MAX_TEXT_MB, check_text_files, read_text_file

GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"  # --gutenberg=ID
SEPARATOR = "\n\n"  # Between the documents of a folder or glob.
MAX_NOTED_FILES = 20  # Files named one by one in the log; the rest are counted.
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
    except UserError:  # Said above (a UserError is a ValueError too: not a failed download).
        raise
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


def read_text(
    path: str | os.PathLike, encoding: str = "utf-8", max_mb: float = MAX_TEXT_MB
) -> str:
    """Read a --data_path file as text (`textfile.read_text_file`: a regular file under
    `max_mb`, not binary), turning every way it can fail into one clear `UserError`."""
    return read_text_file(path, "data_path", encoding=encoding, max_mb=max_mb, data_flags=True)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Keep what lies between the Gutenberg START and END lines. Returns (body, had_markers)."""
    start = _START_RE.search(text)
    end = _END_RE.search(text, start.end() if start else 0)
    if start is None or end is None:
        return text, False
    return text[start.end() : end.start()].strip("\r\n") + "\n", True


def find_files(data_path: str) -> list[Path]:
    """What --data_path names: a file; a folder's *.txt files; or a glob's files. Sorted."""
    kinds = "give a text file, a folder of .txt files or a glob such as 'texts/*.txt'"
    path = Path(data_path).expanduser()
    if path.is_dir():
        # Every non-folder: a FIFO or a device named *.txt is refused by name, not skipped.
        files = sorted(p for p in path.glob("*.txt") if not p.is_dir())
        if not files:
            raise UserError(
                f"--data_path={path} is a folder with no .txt files; add some, or {kinds}."
            )
        return files
    if path.exists():
        return [path]
    if re.search(r"[*?[]", data_path):  # A glob's wildcards.
        matches = glob.glob(os.path.expanduser(data_path), recursive=True)
        files = sorted(Path(p) for p in matches if not os.path.isdir(p))
        if not files:
            raise UserError(
                f"--data_path={data_path} matches no file; fix the pattern (in quotes, so the "
                f"shell leaves it alone), or {kinds}."
            )
        return files
    raise UserError(f"--data_path={path} does not exist; {kinds}.")


def source_files(config: DataConfig) -> list[Path]:
    """The files to train on, downloading the book first where one is asked for; [] means the
    bundled Dracula. --data_path wins over --gutenberg, which wins over --data_url.

    `main` calls this before it writes anything, so a bad path or a failed download leaves no
    trace; `load_documents` calls it again (a download is cached by then). Files that are not
    regular, or too big together for --max_text_mb, are refused here, from their stat alone.
    """
    if config.gutenberg < 0:
        raise UsageError(
            f"--gutenberg must be a book number, or 0 for none; got {config.gutenberg}."
        )
    if config.data_path:
        files = find_files(config.data_path)
    elif config.gutenberg:
        files = [download(GUTENBERG_URL.format(id=config.gutenberg), config.data_dir)]
    elif config.data_url:
        files = [download(config.data_url, config.data_dir)]
    else:
        return []
    check_text_files(files, "data_path", config.max_text_mb, data_flags=True)
    return files


def load_documents(config: DataConfig) -> tuple[list[str], str]:
    """The documents to train on (stripped, lower-cased if asked) and a note on where they came
    from, with every file's character count."""
    paths = source_files(config)
    if not paths:
        body = books.dracula()
        documents, note = [body], f"{books.DRACULA_NOTE}: {len(body):,} characters"
    else:
        documents, counts, stripped = [], [], 0
        for path in paths:
            text = read_text(path, config.encoding, config.max_text_mb)
            body, had_markers = strip_gutenberg(text)
            documents.append(body)
            counts.append(f"{path}: {len(body):,}")
            stripped += had_markers
        note = _files_note(paths, documents, counts, stripped)
    if config.lowercase:
        documents = [document.lower() for document in documents]
    return documents, note


def _files_note(paths: list[Path], documents: list[str], counts: list[str], stripped: int) -> str:
    if len(paths) == 1:
        note = f"{counts[0]} characters"
        return note if stripped else note + " (no Gutenberg START/END lines; using the whole file)"
    shown = counts[:MAX_NOTED_FILES]
    if len(counts) > len(shown):
        shown.append(f"and {len(counts) - len(shown)} more")
    total = sum(map(len, documents)) + len(SEPARATOR) * (len(documents) - 1)
    return (
        f"{len(paths)} files joined by two newlines, {total:,} characters ({'; '.join(shown)}; "
        f"Gutenberg header and licence cut from {stripped})"
    )


def load_corpus(config: DataConfig) -> tuple[str, str]:
    """The whole text to train on, its documents joined by `SEPARATOR`, and a note on it."""
    documents, note = load_documents(config)
    return SEPARATOR.join(documents), note
