"""Export a checkpoint's model as plain files: `python -m lstm_jax.export`.

    python -m lstm_jax.export --workdir=runs/dracula_2x512 --out=exported/dracula_2x512

writes into --out, readable without Orbax or JAX:

    model.safetensors  the parameters, float32, one tensor per leaf named by its path in the
                       Flax tree: `embed/embedding`, `lstm_0/hi/kernel`, ..., `logits/bias`
    config.json        the model settings (`ModelConfig`'s fields) plus `vocab_size`:
                       `models.model_from_settings(config, config["vocab_size"])` rebuilds it
    vocab.json         the vocabulary as one JSON string; a character's id is its index

From Python, `export_model(workdir, out)` does the same and returns what it wrote.

Needs the `safetensors` package: pip install -e '.[export]'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lstm_jax import cli
from lstm_jax.config import setting
from lstm_jax.errors import UsageError, UserError, argument, python_arguments
from lstm_jax.reader import MEMBER_HELP

FILES = ("model.safetensors", "config.json", "vocab.json")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """export: which checkpoint, and where its files go"""

    workdir: str = setting("runs/default", "Run folder of the model to export.")
    checkpoint: str = setting("best", "Checkpoint to export: latest, best or a step number.")
    member: str = setting("", MEMBER_HELP)
    out: str = setting("", "Folder to write model.safetensors, config.json and vocab.json to.")
    overwrite: bool = setting(False, "Write into --out even if it is not empty.")


def safetensors_numpy() -> Any:
    """`safetensors.numpy`, or a `UserError` saying how to install it."""
    try:
        import safetensors.numpy
    except ImportError:
        raise UserError(
            "Export writes safetensors files and needs the safetensors package: "
            "pip install safetensors (or pip install -e '.[export]')."
        ) from None
    return safetensors.numpy


def check_out(out: str, overwrite: bool) -> Path:
    """The output folder, refused when not given, not a folder, or not empty (without
    --overwrite). Nothing is created here."""
    if not out:
        raise UsageError(f"{argument('out')} is required: the folder to write the model to.")
    if "://" in out:
        raise UsageError(f"{argument('out', out)}: export writes to a local folder only.")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{argument('out', str(path))} is a file, not a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(
            f"{argument('out', str(path))} is not empty; choose a new folder or pass "
            f"{argument('overwrite', True)}."
        )
    return path


def flat_params(params: Any) -> dict[str, np.ndarray]:
    """{"lstm_0/hi/kernel": array, ...}: every parameter under its path in the tree."""
    import jax

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        flat[name] = np.ascontiguousarray(np.asarray(leaf))
    return flat


def write_export(out: Path, params: Any, vocab_chars: str, settings: dict, metadata: dict) -> None:
    """The three files into `out` (created if needed)."""
    save_file = safetensors_numpy().save_file
    out.mkdir(parents=True, exist_ok=True)
    metadata = {key: str(value) for key, value in metadata.items()}
    save_file(flat_params(params), str(out / "model.safetensors"), metadata=metadata)
    config = {**settings, "vocab_size": len(vocab_chars)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "vocab.json").write_text(json.dumps(vocab_chars) + "\n")


class Exported(NamedTuple):
    """What an export wrote: the folder (holding `FILES`), the checkpoint's step, parameters."""

    folder: Path
    step: int
    parameters: int


def export(options: ExportOptions) -> Exported:
    """The export of `options` (the command's); a `UserError` before anything is written."""
    safetensors_numpy()  # Before loading anything, so a missing package is said first.
    out = check_out(options.out, options.overwrite)
    from lstm_jax.api import restore

    model, params, vocab, step, meta = restore(options.workdir, options.checkpoint, options.member)
    provenance = {"format": "lstm_jax", "workdir": options.workdir, "step": step}
    provenance["val_bpc"] = meta.get("val_bpc", float("nan"))
    if "member" in meta:  # One member of a population: which, and its seed and settings.
        provenance |= {k: meta[k] for k in ("member", "seed", "member_settings")}
    write_export(out, params, vocab.chars, dataclasses.asdict(model.config), provenance)
    count = sum(int(np.size(x)) for x in flat_params(params).values())
    return Exported(out, step, count)


def export_model(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | int = "best",
    member: str | int = "",
    overwrite: bool = False,
) -> Exported:
    """Export a checkpoint's model ('best', 'latest' or a step number; `member` as for
    `lstm_jax.load`) into the folder `out`, as the command does. Bad arguments raise a
    `UserError` (a `ValueError`) naming them as Python spells them (`out=...`)."""
    options = ExportOptions(
        workdir=os.fspath(workdir), checkpoint=str(checkpoint), member=str(member),
        out=os.fspath(out), overwrite=overwrite,
    )  # fmt: skip
    with python_arguments():
        return export(options)


def main(argv: list[str]) -> None:
    with cli.user_errors():
        cli.refuse_positional_arguments(argv)
        out, step, count = export(cli.read_flags(ExportOptions))
        print(
            f"Wrote {', '.join(FILES)} to {out} (step {step}, {count:,} parameters).",
            file=sys.stderr,
        )


if __name__ == "__main__":
    cli.run(main, [ExportOptions])
