"""Checkpoints: a resumed run is the uninterrupted run; a workdir never takes a foreign model."""

import shutil

import jax
import numpy as np
import pytest

from lstm_jax.checkpoint import Checkpoints
from lstm_jax.errors import UserError
from lstm_jax.train import train_and_evaluate


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("carry_state, stop_at", [(True, 5), (False, 7)])
def test_stop_and_resume_gives_the_parameters_of_an_uninterrupted_run(
    tiny_config, tmp_path, carry_state, stop_at
):
    # Dropout on, so the dropout RNG's position must survive the restart; with carried state the
    # LSTM state must too. Periodic checkpoints at 4 and 8 make the stop fall between saves.
    config = tiny_config.replace(
        dropout=0.2, carry_state=carry_state, num_steps=12, checkpoint_every=4, eval_every=4
    )
    devices = jax.local_devices()[:2]
    straight = train_and_evaluate(config.replace(workdir=str(tmp_path / "a")), devices=devices)
    interrupted = config.replace(workdir=str(tmp_path / "b"))
    _stop_after(interrupted, stop_at, devices)
    resumed = train_and_evaluate(interrupted, devices=devices)
    assert resumed.step == 12
    _assert_trees_equal(straight.params, resumed.params)
    assert straight.val_loss == resumed.val_loss
    assert straight.train_losses[-1] == resumed.train_losses[-1]
    assert (straight.best_step, straight.best_val_loss) == (
        resumed.best_step,
        resumed.best_val_loss,
    )


def _stop_after(config, step, devices):
    """Run `config` but stop (and checkpoint) after `step`, as SIGTERM would."""
    import signal

    from lstm_jax import train

    calls = {"n": 0}
    original = train.Batcher.batch

    def batch_then_signal(self, k, rows=slice(None)):
        calls["n"] += 1
        if calls["n"] == step:
            signal.raise_signal(signal.SIGTERM)
        return original(self, k, rows)

    train.Batcher.batch = batch_then_signal
    try:
        result = train_and_evaluate(config, devices=devices)
    finally:
        train.Batcher.batch = original
    assert result.stopped_early and result.step == step
    return result


def test_workdir_with_another_model_is_refused_before_training(tiny_config, tmp_path):
    devices = jax.local_devices()[:1]
    train_and_evaluate(tiny_config, devices=devices)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(UserError) as error:
        train_and_evaluate(tiny_config.replace(hidden=32, num_layers=1), devices=devices)
    message = str(error.value)
    assert "hidden 16 (saved) vs 32 (now)" in message
    assert "num_layers 2 (saved) vs 1 (now)" in message
    assert "--workdir" in message and "--restart" in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_restart_sets_old_checkpoints_aside_and_trains_anew(tiny_config, tmp_path):
    devices = jax.local_devices()[:1]
    train_and_evaluate(tiny_config, devices=devices)
    result = train_and_evaluate(tiny_config.replace(hidden=32, restart=True), devices=devices)
    assert result.step == tiny_config.optim.num_steps
    aside = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoints.discarded")]
    assert len(aside) == 1 and any(aside[0].iterdir())


def test_keeps_the_latest_and_the_best_checkpoint(tiny_config, tmp_path):
    config = tiny_config.replace(
        num_steps=16, checkpoint_every=2, eval_every=2, keep_checkpoints=1, learning_rate=0.05
    )
    result = train_and_evaluate(config, devices=jax.local_devices()[:1])
    checkpoints = Checkpoints(config.loop.workdir, read_only=True)
    steps = checkpoints.steps()
    assert checkpoints.latest_step() == 16
    assert checkpoints.best_step() == result.best_step
    assert set(steps) == {16, result.best_step}
    meta = checkpoints.read_meta(result.best_step)
    assert meta["val_loss"] == pytest.approx(result.best_val_loss)


def test_checkpoint_resumes_on_another_device_count_with_the_same_global_batch(
    tiny_config, tmp_path
):
    # Dropout off: its masks are drawn per device (the key is folded with the device index), so
    # with it another device count trains on other masks, equally random but not equal. Without
    # it only the order of the float sums over devices differs: parameters agree to 1e-5
    # (measured: under 1e-7).
    config = tiny_config.replace(
        dropout=0.0, num_steps=8, checkpoint_every=4, eval_every=4, carry_state=True
    )
    devices = {n: jax.local_devices()[:n] for n in (1, 4, 8)}
    straight = train_and_evaluate(
        config.replace(workdir=str(tmp_path / "straight")), devices=devices[1]
    )
    resumed = {}
    for before, afters in ((8, (1, 4)), (1, (8,))):
        stopped = config.replace(workdir=str(tmp_path / f"on_{before}"))
        _stop_after(stopped, 5, devices[before])
        for after in afters:
            workdir = tmp_path / f"on_{before}_then_{after}"
            shutil.copytree(stopped.workdir, workdir)
            result = train_and_evaluate(
                config.replace(workdir=str(workdir)), devices=devices[after]
            )
            assert result.step == 8
            resumed[before, after] = result
    for (before, after), result in resumed.items():
        leaves = zip(jax.tree.leaves(straight.params), jax.tree.leaves(result.params), strict=True)
        for x, y in leaves:
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-5, err_msg=f"{before} -> {after}")
        assert result.val_loss == pytest.approx(straight.val_loss, abs=1e-5)
