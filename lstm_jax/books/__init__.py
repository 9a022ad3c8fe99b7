"""Books that ship with the package: Dracula, the default corpus, so a first run needs no network.

`dracula.txt.xz` is the body of Project Gutenberg eBook #345 (Bram Stoker, public domain in the
USA) with the Gutenberg header and licence cut off by `lstm_jax.data.strip_gutenberg`: exactly
the text that `--data_path=pg345.txt` trains on, so results stay comparable. Made with

    python -c "import lzma; from lstm_jax.data import read_text, strip_gutenberg; \
        body = strip_gutenberg(read_text('pg345.txt'))[0]; \
        open('lstm_jax/books/dracula.txt.xz', 'wb').write(lzma.compress(body.encode(), preset=9))"
"""

from __future__ import annotations

import hashlib
import importlib.resources
import lzma

from lstm_jax.errors import UserError

DRACULA_FILE = "dracula.txt.xz"
# SHA-256 of the decompressed body (UTF-8): 845,922 characters, 855,106 bytes.
DRACULA_SHA256 = "2635b9382f91c01395b822cce6ba622389b2882855c6029f9cb4eb19b5a421db"
DRACULA_NOTE = "Dracula (Project Gutenberg #345, bundled with lstm_jax)"


def dracula() -> str:
    """The bundled Dracula body, checked against its SHA-256."""
    where = f"lstm_jax/books/{DRACULA_FILE}"
    fix = "reinstall lstm_jax (pip install --force-reinstall) or pass --data_path=FILE"
    try:
        raw = lzma.decompress(
            importlib.resources.files(__name__).joinpath(DRACULA_FILE).read_bytes()
        )
    except (OSError, lzma.LZMAError) as e:
        raise UserError(f"The bundled book {where} cannot be read ({e}); {fix}.") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DRACULA_SHA256:
        raise UserError(
            f"The bundled book {where} is damaged (SHA-256 {digest[:12]}..., expected "
            f"{DRACULA_SHA256[:12]}...); {fix}."
        )
    return raw.decode("utf-8")
