"""How a setting is declared (`setting`, `section`) and how settings dataclasses are walked.

The settings themselves live in `lstm_jax.config`; this module is the machinery under them: the
command line (`lstm_jax.cli`) and the `Config` methods go through these walkers, so a new field
is a flag, a flagfile line and a checkpoint key with no other edit.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def setting(
    default: Any,
    help: str,  # noqa: A002 - the word absl uses.
    *,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    must_match: bool = False,
) -> Any:
    """A dataclass field that is also a command-line flag.

    help: one line for `--help`, with the unit where there is one (the default is added).
    choices: the allowed strings, for an enum flag.
    flag: the flag's name where it differs from the field's.
    must_match: a resumed run must have the same value as the run it continues.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "must_match": must_match}
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    """A nested section of settings, with its defaults."""
    return dataclasses.field(default_factory=cls)


# --- Walking the settings --------------------------------------------------------------------


def is_section(field: dataclasses.Field) -> bool:
    return "help" not in field.metadata


def field_types(cls: type) -> dict[str, type]:
    """The fields' types, resolved (the settings modules use postponed annotations)."""
    return typing.get_type_hints(cls)


def leaf_fields(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field, type]]:
    """Every setting of a (nested) settings dataclass: (path of section names, field, type)."""
    leaves = []
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if is_section(f):
            leaves += [((f.name, *path), g, t) for path, g, t in leaf_fields(types[f.name])]
        else:
            leaves.append(((), f, types[f.name]))
    return leaves


def leaf_settings(obj: Any) -> list[tuple[dataclasses.Field, Any]]:
    """Every setting of a settings dataclass instance with its value."""
    out = []
    for path, f, _ in leaf_fields(type(obj)):
        section_value = obj
        for name in path:
            section_value = getattr(section_value, name)
        out.append((f, getattr(section_value, f.name)))
    return out


def replace_settings(obj: Any, changes: dict[str, Any]) -> Any:
    """`dataclasses.replace` that routes flat setting names into their sections."""
    changes = dict(changes)
    direct = {f.name: changes.pop(f.name) for f in dataclasses.fields(obj) if f.name in changes}
    types = field_types(type(obj))
    for f in dataclasses.fields(obj):
        if not is_section(f) or f.name in direct:
            continue
        names = {g.name for _, g, _ in leaf_fields(types[f.name])}
        mine = {k: changes.pop(k) for k in list(changes) if k in names}
        if mine:
            direct[f.name] = replace_settings(getattr(obj, f.name), mine)
    if changes:
        raise TypeError(f"{type(obj).__name__} has no setting {', '.join(sorted(changes))}")
    return dataclasses.replace(obj, **direct)


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """A settings dataclass from `dataclasses.asdict` output; unknown keys are an error."""
    types = field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = from_dict(types[f.name], value) if is_section(f) else value
    unknown = set(values) - set(kwargs)
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(sorted(unknown))}")
    return cls(**kwargs)
