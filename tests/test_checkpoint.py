"""Checkpoints: a resumed run is the uninterrupted run; a workdir never takes a foreign model."""

import math
import shutil

import jax
import numpy as np
import pytest
from builders import stop_after
from subprocesses import run_module

from lstm_jax.checkpoint import Checkpoints
from lstm_jax.config import Config, complete_settings
from lstm_jax.data import Vocab
from lstm_jax.errors import UserError
from lstm_jax.generate import sample_text
from lstm_jax.models import build_model, init_params
from lstm_jax.resume import restore_latest_usable
from lstm_jax.steps import create_train_state
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
    stop_after(interrupted, stop_at, devices)
    resumed = train_and_evaluate(interrupted, devices=devices)
    assert resumed.step == 12
    _assert_trees_equal(straight.params, resumed.params)
    assert straight.val_loss == resumed.val_loss
    assert straight.train_losses[-1] == resumed.train_losses[-1]
    assert (straight.best_step, straight.best_val_loss) == (
        resumed.best_step,
        resumed.best_val_loss,
    )


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


def test_a_workdir_of_another_vocabulary_is_refused_naming_the_characters(tiny_config, tmp_path):
    model = build_model(tiny_config, 4)
    state = create_train_state(
        model, init_params(model, jax.random.key(0)), tiny_config.optim, 4, jax.random.key(1)
    )
    carry = jax.tree.map(np.asarray, model.initialize_carry(tiny_config.data.global_batch))
    checkpoints = Checkpoints(tmp_path / "run", keep=1)
    meta = {"vocab": "\n ab\u00e9", "settings": {}, "val_loss": 1.0}  # Other settings: same.
    checkpoints.save(2, state=state, carry=carry, meta=meta, val_loss=1.0)
    checkpoints.wait()
    with pytest.raises(UserError) as error:  # Refused before anything is restored.
        restore_latest_usable(checkpoints, None, None, None, complete_settings({}), " abZ")
    checkpoints.close()
    message = str(error.value)
    named = "vocabulary differs ('\\n', '\u00e9' only in the saved run; 'Z' only in this text)"
    assert named in message
    assert "--workdir" in message and "--restart" in message


def test_restart_sets_old_checkpoints_aside_and_trains_anew(tiny_config, tmp_path):
    devices = jax.local_devices()[:1]
    train_and_evaluate(tiny_config, devices=devices)
    result = train_and_evaluate(tiny_config.replace(hidden=32, restart=True), devices=devices)
    assert result.step == tiny_config.optim.num_steps
    aside = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoints.discarded")]
    assert len(aside) == 1 and any(aside[0].iterdir())


def test_keeps_the_latest_and_the_best_checkpoint(tiny_config, tmp_path):
    # Validation losses chosen so the best is neither the first nor among the latest.
    val_losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: 4.0, 10: 5.0}
    model = build_model(tiny_config, 10)
    state = create_train_state(
        model, init_params(model, jax.random.key(0)), tiny_config.optim, 10, jax.random.key(1)
    )
    carry = jax.tree.map(np.asarray, model.initialize_carry(tiny_config.data.global_batch))
    checkpoints = Checkpoints(tmp_path / "run", keep=1)
    for step, val_loss in val_losses.items():
        meta = {"vocab": "", "settings": {}, "val_loss": val_loss}
        checkpoints.save(step, state=state, carry=carry, meta=meta, val_loss=val_loss)
        checkpoints.wait()
    checkpoints.close()
    kept = Checkpoints(tmp_path / "run", read_only=True)
    assert sorted(kept.steps()) == [4, 10]
    assert (kept.best_step(), kept.latest_step()) == (4, 10)
    assert kept.read_meta(4)["val_loss"] == 1.0


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
        stop_after(stopped, 5, devices[before])
        for after in afters:
            workdir = tmp_path / f"on_{before}_then_{after}"
            shutil.copytree(stopped.loop.workdir, workdir)
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


def test_checkpoint_best_latest_and_a_step_pick_their_checkpoints_and_sample_uses_best(tmp_path):
    # Three saves of a tiny model, each with its own parameters, where the best by validation
    # loss is neither the first nor the latest.
    vocab = Vocab(" .abcdefghij")
    config = Config.create(embed_dim=8, hidden=16, num_layers=2, seq_len=16, global_batch=8)
    model = build_model(config, vocab.size)
    val_losses = {10: 1.8, 20: 1.2, 30: 1.5}
    workdir = tmp_path / "run"
    checkpoints = Checkpoints(workdir, keep=3)
    params = {}
    for seed, (step, val_loss) in enumerate(val_losses.items()):
        # Scaled up so that greedy continuations of different parameters differ.
        params[step] = jax.tree.map(lambda p: 3.0 * p, init_params(model, jax.random.key(seed)))
        checkpoints.save(
            step,
            state=create_train_state(model, params[step], config.optim, 10, jax.random.key(seed)),
            carry=jax.tree.map(np.asarray, model.initialize_carry(config.data.global_batch)),
            meta={
                "vocab": vocab.chars,
                "settings": config.run_settings(),
                "step": step,
                "val_loss": val_loss,
                "val_bpc": val_loss / math.log(2),
            },
            val_loss=val_loss,
        )
    checkpoints.wait()
    checkpoints.close()

    saved = Checkpoints(workdir, read_only=True)
    assert saved.steps() == [10, 20, 30]
    assert saved.resolve("best") == 20  # The lowest validation loss.
    assert saved.resolve("latest") == 30  # The highest step.
    assert saved.resolve("10") == 10

    greedy = {
        step: sample_text(model, p, vocab, "a", length=30, temperature=0.0)[0]
        for step, p in params.items()
    }
    assert len(set(greedy.values())) == 3  # The text tells which checkpoint it came from.
    result = run_module(
        "lstm_jax.sample",
        f"--workdir={workdir}",
        "--checkpoint=best",
        "--prompt=a",
        "--length=30",
        "--temperature=0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"# step 20, validation {1.2 / math.log(2):.3f} bpc" in result.stderr
    assert result.stdout == "a" + greedy[20] + "\n"
