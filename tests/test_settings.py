"""Declared ranges: one checker for every command's numbers, and every number declares one."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import pkgutil

import pytest

import lstm_jax
from lstm_jax.errors import UsageError
from lstm_jax.settings import (
    NON_NEGATIVE,
    POSITIVE,
    UNBOUNDED,
    Range,
    check_ranges,
    leaf_fields,
    section,
    setting,
)

INF, NAN = math.inf, math.nan


@dataclasses.dataclass(frozen=True)
class Inner:
    """a section"""

    rate: float = setting(0.5, "A rate.", within=Range(0, 1, high_open=True))
    share: float = setting(0.5, "A share.", within=Range(0, 1, low_open=True))


@dataclasses.dataclass(frozen=True)
class Outer:
    """settings with every kind of bound"""

    count: int = setting(1, "A count.", within=POSITIVE)
    steps: int = setting(0, "Steps.", within=NON_NEGATIVE, flag="num_steps")
    index: int = setting(-1, "An index; -1: none.", within=Range(-1))
    cap: float = setting(5.0, "A cap.", within=Range(high=5))
    below: float = setting(0.0, "Below 5.", within=Range(high=5, high_open=True))
    limit: float = setting(INF, "A limit; inf: none.", within=Range(0, allow_inf=True))
    offset: float = setting(0.0, "Any offset.", within=UNBOUNDED)
    name: str = setting("x", "Not a number.")
    flag: bool = setting(False, "Not a number either.")
    inner: Inner = section(Inner)


def _refused(message: str, **changes) -> None:
    top = {k: v for k, v in changes.items() if k not in ("rate", "share")}
    inner = {k: v for k, v in changes.items() if k in ("rate", "share")}
    with pytest.raises(UsageError) as raised:
        check_ranges(Outer(**top, inner=Inner(**inner)))
    assert str(raised.value) == message


def test_each_bound_kind_is_checked_at_its_edges_with_the_flags_name():
    check_ranges(Outer())
    check_ranges(Outer(count=1, steps=0, index=-1, cap=5.0, below=4.999, limit=0.0))
    check_ranges(Outer(inner=Inner(rate=0.0, share=1.0)))  # The included edges.
    _refused("--count must be > 0, got 0.", count=0)
    _refused("--num_steps must be >= 0, got -1.", steps=-1)  # The flag's name, not the field's.
    _refused("--index must be >= -1, got -2.", index=-2)
    _refused("--cap must be <= 5, got 5.5.", cap=5.5)
    _refused("--below must be < 5, got 5.0.", below=5.0)
    _refused("--rate must be in [0, 1), got 1.0.", rate=1.0)  # In a section.
    _refused("--rate must be in [0, 1), got -0.1.", rate=-0.1)
    _refused("--share must be in (0, 1], got 0.0.", share=0.0)
    _refused("--share must be in (0, 1], got 1.5.", share=1.5)
    _refused("--limit must be a number >= 0, got -inf.", limit=-INF)


def test_nan_and_inf_are_refused_unless_inf_is_allowed():
    _refused("--cap must be a finite number <= 5, got -inf.", cap=-INF)
    _refused("--rate must be a finite number in [0, 1), got nan.", rate=NAN)
    _refused("--offset must be a finite number, got inf.", offset=INF)
    _refused("--offset must be a finite number, got nan.", offset=NAN)
    _refused("--limit must be a number >= 0, got nan.", limit=NAN)
    check_ranges(Outer(limit=INF, offset=-1e300))
    check_ranges(Outer(count=10**30))  # A Python int beyond any float or int64 is compared.
    _refused(f"--index must be >= -1, got {-(10**30)}.", index=-(10**30))


def test_the_range_is_said_in_the_help():
    help_of = {f.name: f.metadata["help"] for _, f, _ in leaf_fields(Outer)}
    assert help_of["count"] == "A count. Must be > 0."
    assert help_of["rate"] == "A rate. Must be in [0, 1)."
    assert help_of["share"] == "A share. Must be in (0, 1]."
    assert help_of["index"] == "An index; -1: none. Must be >= -1."
    assert help_of["offset"] == "Any offset."  # Unbounded: nothing to say.


def _declares_settings(cls: type) -> bool:
    """A dataclass with a field declared by `setting`, or a section that has one."""
    if not dataclasses.is_dataclass(cls):
        return False
    fields = dataclasses.fields(cls)
    sections = [f.default_factory for f in fields if inspect.isclass(f.default_factory)]
    return any("help" in f.metadata for f in fields) or any(map(_declares_settings, sections))


def _settings_classes() -> list[type]:
    """Every settings dataclass in the package (each module imported)."""
    found = {}
    for module_info in pkgutil.walk_packages(lstm_jax.__path__, "lstm_jax."):
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, _declares_settings):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(found.values())


def test_every_number_of_every_command_declares_its_range():
    classes = {cls.__name__ for cls in _settings_classes()}
    # The commands' options (main, sample, bench, evaluate, distributed), so the walk sees them.
    commands = {"Config", "SampleOptions", "BenchOptions", "EvaluateOptions", "DistributedOptions"}
    assert commands <= classes, commands - classes
    undeclared = []
    for cls in _settings_classes():
        for _, f, kind in leaf_fields(cls):
            if kind in (int, float) and not isinstance(f.metadata.get("within"), Range):
                undeclared.append(f"{cls.__name__}.{f.name}")
    assert not undeclared, f"declare within= (UNBOUNDED if any value will do): {undeclared}"


def test_every_seed_is_a_32_bit_unsigned_integer():
    seeds = [
        (cls.__name__, f) for cls in _settings_classes() for _, f, _ in leaf_fields(cls)
        if "seed" in f.name and f.name != "seeds"  # --seeds counts seeds.
    ]  # fmt: skip
    assert {name for name, _ in seeds} >= {"DataConfig", "SampleOptions"}
    for _, f in seeds:
        assert f.metadata["within"] == Range(0, 2**32 - 1), f.name
        assert "Must be in [0, 4294967295]" in f.metadata["help"]


def test_the_library_entry_points_check_ranges_as_the_commands_do():
    from lstm_jax import bench
    from lstm_jax.config import Config
    from lstm_jax.sample import SampleOptions, check_sampling_args

    with pytest.raises(UsageError, match=r"--seed must be in \[0, 4294967295\], got -1\."):
        Config.create(seed=-1).validate()  # What train_and_evaluate runs first.
    with pytest.raises(UsageError, match=r"--windows must be > 0, got 0\."):
        bench.validate(bench.BenchConfig(), bench.BenchOptions(windows=0), 1)  # run_benchmark's.
    with pytest.raises(UsageError, match=r"--top_p must be a finite number in \(0, 1\]"):
        check_sampling_args(SampleOptions(top_p=NAN), 96)  # lstm_jax.load(...).generate's.
