"""The shape of the code: one declaration per setting, each command's own --help, no import
circle, small modules and functions."""

import ast
import dataclasses
from pathlib import Path

import pytest
from absl import flags
from subprocesses import run_module

from lstm_jax import cli
from lstm_jax.config import Config, ModelConfig, from_dict, leaf_settings

PACKAGE = Path(__file__).resolve().parents[1] / "lstm_jax"


def test_every_setting_has_one_flag_of_its_name_and_type_and_round_trips_a_flagfile(tmp_path):
    changed = Config.create(
        hidden=96, cell="gru", lowercase=True, learning_rate=3e-4, num_epochs=2.5,
        prompt="It was", dropout_at="output", workdir=str(tmp_path / "w"),
    )  # fmt: skip
    args = []
    for field, value in leaf_settings(changed):
        args.append(f"--{'' if value else 'no'}{field.name}" if value is True or value is False
                    else f"--{field.name}={value}")  # fmt: skip
    given = flags.FlagValues()
    cli.define_flags(Config, given)
    given(["main", *args])
    for field, value in leaf_settings(changed):
        assert type(given[field.name].value) is type(value), field.name
    assert cli.read_flags(Config, given) == changed
    # The flagfile a run writes gives the same Config back to fresh flags.
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text(cli.flagfile_text(Config, given))
    fresh = flags.FlagValues()
    cli.define_flags(Config, fresh)
    fresh(["main", f"--flagfile={flagfile}"])
    assert cli.read_flags(Config, fresh) == changed


def test_a_checkpoint_saves_the_model_config_as_a_dict_that_rebuilds_it():
    model = ModelConfig(cell="slstm", hidden=40, residual=True)
    assert from_dict(ModelConfig, dataclasses.asdict(model)) == model
    config = Config.create(cell="slstm", hidden=40, residual=True)
    assert from_dict(Config, dataclasses.asdict(config)) == config
    assert set(dataclasses.asdict(model)) <= set(config.run_settings())


@pytest.mark.parametrize(
    "module, shown, not_shown",
    [
        (
            "lstm_jax.main",
            ["--hidden:", "--learning_rate:", "--workdir:", "--prompt:", "--coordinator_address:"],
            ["--top_k", "--num_samples", "--jax_", "--helpfull:"],
        ),
        (
            "lstm_jax.sample",
            ["--workdir:", "--checkpoint:", "--top_k:", "--temperature:", "--seed:"],
            ["--hidden", "--learning_rate", "--data_path", "--jax_"],
        ),
    ],
)
def test_help_lists_the_commands_own_flags_grouped_with_defaults(module, shown, not_shown):
    result = run_module(module, "--help")
    for name in shown:
        assert name in result.stdout, name
    for name in not_shown:
        assert name not in result.stdout, name
    if module == "lstm_jax.main":
        for group in ("data:", "model:", "regularization:", "optim:", "loop:", "sample:"):
            assert f"\n{group}" in result.stdout, group
        # Each number's range is said, from its declaration, before the default.
        for line in (
            "--hidden: Units (cell width) per layer. Must be > 0. (default: 512)",
            "--dropout: Dropout rate; where it applies: --dropout_at. Must be in [0, 1).",
        ):
            assert line in result.stdout, line


def _imports(path: Path) -> set[str]:
    """lstm_jax modules that a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lstm_jax"):
            if node.module == "lstm_jax":
                found |= {f"lstm_jax.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lstm_jax.")}
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle_in_the_package():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(" -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            # A package imports its own submodules (the cell registry); not a circle.
            if not dependency.startswith(module + "."):
                visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_modules_stay_under_400_lines_and_functions_under_80():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        assert len(lines) <= 400, f"{path.name}: {len(lines)} lines"
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{path.name}:{node.name} has {length} lines"
