"""Populations (`--seeds`, `--grid`): many runs in one job, each member the run of its settings.

The reference for a member is the single run of its own settings, trained by the same code
path every run takes; the comparison numbers of `report` are checked against closed forms.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from builders import stop_after
from subprocesses import run_module

from lstm_jax import population
from lstm_jax.errors import UsageError, UserError
from lstm_jax.train import train_and_evaluate

# Parameters of a member and of its single run: equal up to this. Bitwise where XLA compiles
# both alike; the vmapped step batches the matmuls over the members, whose summation order
# can round differently (largest seen: 6e-8 on the 1-device layout).
PARAMS_ATOL = 1e-6


def _max_difference(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _member(params, k):
    return jax.tree.map(lambda x: np.asarray(x)[k], params)


@pytest.fixture
def pop_config(tiny_config):
    # Dropout on (each member draws its own masks), evaluated and checkpointed twice.
    return tiny_config.replace(
        dropout=0.2, num_steps=8, eval_every=4, checkpoint_every=4, num_layers=1
    )


# CI runs one member after another on one device and all batched and sharded over 8 (the two
# layouts furthest apart); the other two cases run with -m slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "num_devices, grid, seeds, member_loop",
    [
        # 8 members, data parallel on 1, one after another (auto on a CPU) and batched.
        (1, "learning_rate=0.01,0.02;dropout=0.1,0.3", 2, "auto"),
        pytest.param(1, "learning_rate=0.01,0.02;dropout=0.1,0.3", 2, "vmap", marks=SLOW),
        # 4 members, each data parallel over 8.
        pytest.param(8, "learning_rate=0.01,0.02", 2, "auto", marks=SLOW),
        (8, "learning_rate=0.01,0.02;dropout=0.1,0.3", 2, "vmap"),  # 8 sharded, 1 a device.
    ],
)
def test_each_member_trains_as_the_single_run_of_its_settings(
    pop_config, tmp_path, num_devices, grid, seeds, member_loop
):
    devices = jax.local_devices()[:num_devices]
    config = pop_config.replace(
        workdir=str(tmp_path / "pop"), seeds=seeds, grid=grid, member_loop=member_loop
    )
    members = population.members(config)
    sharded = len(members) % num_devices == 0 and num_devices > 1
    result = train_and_evaluate(config, devices=devices)
    assert len(result.members) == len(members)
    # A seed axis, a learning-rate axis and a dropout axis: the first member, the next seed,
    # the next learning rate, and (with a dropout axis) the next dropout.
    checked = sorted({0, 1, seeds * (len(members) // seeds // 2), len(members) - 1})
    for k in checked:
        member = members[k]
        single = train_and_evaluate(
            member.config.replace(seeds=1, grid="", workdir=str(tmp_path / f"single{k}")),
            # The sharded layout puts a member's whole batch on one device: a 1-device run.
            devices=devices[:1] if sharded else devices,
        )
        difference = _max_difference(_member(result.params, k), single.params)
        print(f"member {k} ({member_loop}): largest parameter difference {difference:.2e}")
        assert difference <= PARAMS_ATOL
        row = result.members[k]
        assert (row["seed"], row["settings"]) == (member.seed, member.settings)
        assert row["best_step"] == single.best_step
        for key, loss in (("val_bpc", single.best_val_loss), ("test_bpc", single.test_loss)):
            assert row[key] == pytest.approx(loss / math.log(2), rel=1e-6, abs=0), key


def test_sharded_and_data_parallel_layouts_train_the_same_members(pop_config, tmp_path):
    config = pop_config.replace(seeds=8, grid="")
    sharded = train_and_evaluate(
        config.replace(workdir=str(tmp_path / "sharded")), devices=jax.local_devices()
    )
    one_device = train_and_evaluate(  # Batched, where the sharded run maps (auto on a CPU).
        config.replace(workdir=str(tmp_path / "one"), member_loop="vmap"),
        devices=jax.local_devices()[:1],
    )
    assert _max_difference(sharded.params, one_device.params) <= PARAMS_ATOL
    for a, b in zip(sharded.members, one_device.members, strict=True):
        assert a["val_bpc"] == pytest.approx(b["val_bpc"], rel=1e-6)


def test_a_stopped_and_resumed_population_equals_one_that_ran_through(pop_config, tmp_path):
    config = pop_config.replace(seeds=2, grid="dropout=0.1,0.3", num_steps=12)
    devices = jax.local_devices()[:2]  # 4 members sharded over 2 devices.
    straight = train_and_evaluate(config.replace(workdir=str(tmp_path / "a")), devices=devices)
    interrupted = config.replace(workdir=str(tmp_path / "b"))
    stop_after(interrupted, 5, devices, batches_per_step=4)  # Between the saves at 4 and 8.
    resumed = train_and_evaluate(interrupted, devices=devices)
    assert resumed.step == 12
    assert _max_difference(straight.params, resumed.params) == 0
    assert straight.members == resumed.members
    assert json.loads((tmp_path / "a" / "results.json").read_text()) == json.loads(
        (tmp_path / "b" / "results.json").read_text()
    )


def test_results_json_of_a_single_run_and_of_a_population(pop_config, tmp_path):
    single = train_and_evaluate(pop_config, devices=jax.local_devices()[:1])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    (row,) = results["members"]
    assert row["seed"] == pop_config.data.seed and row["settings"] == {}
    assert row["best_step"] == single.best_step
    assert row["val_bpc"] == pytest.approx(single.best_val_loss / math.log(2))
    assert row["test_bpc"] == pytest.approx(single.test_loss / math.log(2))
    (group,) = results["groups"]
    assert group["n"] == 1 and group["val_bpc_std"] is None  # Strict JSON: null, not NaN.

    config = pop_config.replace(workdir=str(tmp_path / "pop"), seeds=3, grid="dropout=0.1,0.3")
    train_and_evaluate(config, devices=jax.local_devices()[:1])
    results = json.loads((tmp_path / "pop" / "results.json").read_text())
    assert [r["seed"] for r in results["members"]] == [0, 1, 2, 0, 1, 2]
    for group, dropout in zip(results["groups"], (0.1, 0.3), strict=True):
        rows = [r for r in results["members"] if r["settings"] == {"dropout": dropout}]
        test = [r["test_bpc"] for r in rows]
        assert group["settings"] == {"dropout": dropout} and group["n"] == 3
        assert group["test_bpc_mean"] == pytest.approx(sum(test) / 3)
        mean = sum(test) / 3
        assert group["test_bpc_std"] == pytest.approx(
            math.sqrt(sum((t - mean) ** 2 for t in test) / 2)
        )


def test_a_workdir_refuses_to_resume_with_another_population(pop_config, tmp_path):
    devices = jax.local_devices()[:1]
    train_and_evaluate(pop_config.replace(seeds=2), devices=devices)
    checkpoints = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    for changed in (dict(seeds=3), dict(seeds=2, grid="dropout=0.1,0.3"), dict(seeds=1)):
        with pytest.raises(UserError) as error:
            train_and_evaluate(pop_config.replace(num_steps=12, **changed), devices=devices)
        name = "grid" if "grid" in changed else "seeds"
        assert name in str(error.value) and "--restart" in str(error.value)
    assert sorted(p.name for p in checkpoints.iterdir()) == before


def test_readers_pick_a_member_by_index_or_settings_and_default_to_the_best(pop_config, tmp_path):
    import lstm_jax

    config = pop_config.replace(seeds=2, grid="learning_rate=0.01,0.03")
    result = train_and_evaluate(config, devices=jax.local_devices()[:1])
    workdir = tmp_path / "run"
    best = min(range(4), key=lambda k: result.members[k]["val_bpc"])
    for member, k in (("", best), (2, 2), ("learning_rate=0.01,seed=1", 1)):
        model = lstm_jax.load(workdir, member=member)
        # The member's best checkpoint by its own validation (the last step here: all improve).
        assert model.step == result.members[k]["best_step"]
        assert model.val_bpc == pytest.approx(result.members[k]["val_bpc"])
        assert _max_difference(model.params, _member(result.params, k)) == 0
    for bad, says in (
        (4, "member 4 is not in 0 to 3"),
        ("dropout=0.5", "No member"),
        ("fast", "is not an index or NAME=VALUE"),
    ):
        with pytest.raises(UserError, match=says):
            lstm_jax.load(workdir, member=bad)
    info = run_module("lstm_jax.info", str(workdir), "--member=1")
    assert info.returncode == 0, info.stderr
    assert "* is the best of member 1 (seed 1, learning_rate=0.01)" in info.stdout
    assert "4 members (--member=K picks one)" in info.stdout
    sample = run_module("lstm_jax.sample", f"--workdir={workdir}", "--length=20", "--member=3")
    assert sample.returncode == 0, sample.stderr
    assert "member 3 (seed 1, learning_rate=0.03)" in sample.stderr


def test_a_single_run_refuses_a_member_other_than_its_own(pop_config, tmp_path):
    import lstm_jax

    result = train_and_evaluate(pop_config, devices=jax.local_devices()[:1])
    assert lstm_jax.load(tmp_path / "run", member=0).step == result.best_step
    with pytest.raises(UserError, match="is a single run"):
        lstm_jax.load(tmp_path / "run", member=1)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--grid=learning_rate"], "is not NAME=V1,V2"),
        (["--grid=;"], "--grid is empty"),
        (["--grid=dropout=0.1;dropout=0.2"], "names dropout twice"),
        (["--grid=learning_rat=0.1,0.2"], "no setting is called learning_rat"),
        (["--grid=hidden=64,128"], "Run each value as its own run"),
        (["--grid=dropout=0.1,1.5"], "--dropout must be in"),
        (["--grid=learning_rate=0.1,fast"], "is not a number"),
        (["--seeds=0"], "--seeds must be in [1, 4096]"),
        (["--seeds=4096", "--hidden=4096", "--num_layers=4"], "Lower --seeds"),
    ],
)
def test_bad_population_input_is_one_line_and_writes_nothing(tmp_path, flags, says):
    workdir = tmp_path / "never"
    done = run_module("lstm_jax.main", f"--workdir={workdir}", "--num_steps=2", *flags)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and says in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    assert not workdir.exists()


def test_group_comparison_is_the_paired_t_interval_or_welchs():
    # Paired: differences 0.01, 0.02, 0.03 -> mean 0.02, sd 0.01, t(0.975, 2) = 4.303.
    a = {0: 1.00, 1: 1.10, 2: 1.20}
    b = {0: 1.01, 1: 1.12, 2: 1.23}
    delta, low, high, paired = population.compare(a, b)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert paired and delta == pytest.approx(0.02)
    assert (low, high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    # Other seeds: Welch. Variances 0.01 and 0.0025 over 3 each: se^2 = 0.004167, and
    # Welch-Satterthwaite dof = 0.004167^2 / (0.003333^2/2 + 0.000833^2/2) = 2.94 -> 2.
    c = {3: 1.05, 4: 1.10, 5: 1.15}
    delta, low, high, paired = population.compare(a, c)
    se = math.sqrt(0.01 / 3 + 0.0025 / 3)
    assert not paired and delta == pytest.approx(0.0)
    assert high == pytest.approx(4.303 * se)


def test_the_grid_parses_in_order_and_seeds_follow_seed(tiny_config):
    config = tiny_config.replace(seed=5, seeds=2, grid=" learning_rate = 0.01, 0.02 ; dropout=0.1")
    members = population.members(config)
    assert [(m.seed, m.settings) for m in members] == [
        (5, {"learning_rate": 0.01, "dropout": 0.1}),
        (6, {"learning_rate": 0.01, "dropout": 0.1}),
        (5, {"learning_rate": 0.02, "dropout": 0.1}),
        (6, {"learning_rate": 0.02, "dropout": 0.1}),
    ]
    assert members[3].config.optim.learning_rate == 0.02 and members[3].config.data.seed == 6
    with pytest.raises(UsageError, match="grad_clip=0 turns it off"):
        population.members(tiny_config.replace(grid="grad_clip=0,1"))
