"""How a setting is declared (`setting`, `section`, `Range`), walked, and range-checked.

The settings themselves live in `lstm_jax.config` and in each command's options class; this
module is the machinery under them: the command line (`lstm_jax.cli`) and the `Config` methods
go through these walkers, so a new field is a flag, a flagfile line and a checkpoint key with no
other edit. A number's range is declared with the number (`within=`), shown in its `--help`,
and checked by `check_ranges`, the one range check of every command.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from lstm_jax.errors import UsageError, argument


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number setting may take: from `low` to `high` (None: no bound), each bound
    included unless `low_open` / `high_open`. A float must also be finite, unless `allow_inf`
    (NaN never is)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allow_inf: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not (
            math.isfinite(value) or (self.allow_inf and math.isinf(value))
        ):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        """`in [0, 1)`, `> 0`, `<= 5`; empty without bounds."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low}, {self.high}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return ""


UNBOUNDED = Range()  # Any value (any finite one, for a float): said on purpose.
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
RATE = Range(0, 1, high_open=True)  # A probability below 1: dropout, a decay, a share.
# JAX's default PRNG (threefry, without x64) keeps a seed's low 32 bits: 2**32 + 5 draws what 5
# draws, and a seed of 2**63 or more raises OverflowError. NumPy refuses negative seeds.
SEED = Range(0, 2**32 - 1)
MEMBERS = Range(1, 4096)  # A population's size: --seeds, bench's --population.


def setting(
    default: Any,
    help: str,  # noqa: A002 - the word absl uses.
    *,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    must_match: bool = False,
    within: Range | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag.

    help: one line for `--help`, with the unit where there is one (the range and the default
        are added).
    choices: the allowed strings, for an enum flag.
    flag: the flag's name where it differs from the field's.
    must_match: a resumed run must have the same value as the run it continues.
    within: the values a number may take (`UNBOUNDED`: any); every int and float setting
        declares one (a test walks them all). Checked by `check_ranges`.
    """
    shown = f"{help} Must be {within}." if within is not None and str(within) else help
    metadata = {
        "help": shown, "choices": choices, "flag": flag, "must_match": must_match, "within": within
    }  # fmt: skip
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    """A nested section of settings, with its defaults."""
    return dataclasses.field(default_factory=cls)


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or field.name


def _named(field: dataclasses.Field) -> str:
    """The setting as the user gave it: its flag, or from Python its argument (`argument`)."""
    return argument(field.name, flag=flag_name(field))


def check_choices(settings: Any) -> None:
    """Raise `UsageError` naming the first setting that is not one of its declared choices."""
    for f, value in leaf_settings(settings):
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            wanted = ", ".join(choices)
            raise UsageError(f"{_named(f)} must be one of {wanted}, got {value!r}.")


def check_ranges(settings: Any) -> None:
    """Raise `UsageError` naming the first number of a settings dataclass (sections included)
    outside its declared range, or a float that is NaN or infinite where not allowed."""
    for f, value in leaf_settings(settings):
        within = f.metadata.get("within") or UNBOUNDED
        if isinstance(value, bool) or not isinstance(value, int | float) or value in within:
            continue
        finite = isinstance(value, int) or math.isfinite(value)
        kind = "" if finite else "a number " if within.allow_inf else "a finite number "
        wanted = f"{kind}{within}".strip()
        raise UsageError(f"{_named(f)} must be {wanted}, got {value}.")


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
