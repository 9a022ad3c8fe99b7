"""Small builders the tests share: models from flat settings, a run stopped as SIGTERM stops it,
parameters split between CI and `-m slow`."""

import pytest

from lstm_jax.config import Config
from lstm_jax.models import CharLSTM, build_model


def make_model(vocab_size: int, **settings) -> CharLSTM:
    """A `CharLSTM` from flat setting names; dropout 0 unless given."""
    return build_model(Config.create(**{"dropout": 0.0, **settings}), vocab_size)


def stop_after(config, step, devices, batches_per_step: int = 1):
    """Run `config` but SIGTERM it once `step` steps have read their batches, as a preempted VM
    is stopped: it finishes that step, checkpoints and returns early. `batches_per_step`: a
    population's members each read one a step."""
    import signal

    from lstm_jax.data import Batcher
    from lstm_jax.train import train_and_evaluate

    calls = {"n": 0}
    original = Batcher.batch

    def batch_then_signal(self, k, rows=slice(None)):
        calls["n"] += 1
        if calls["n"] == step * batches_per_step:
            signal.raise_signal(signal.SIGTERM)
        return original(self, k, rows)

    Batcher.batch = batch_then_signal
    try:
        result = train_and_evaluate(config, devices=devices)
    finally:
        Batcher.batch = original
    assert result.stopped_early and result.step == step
    return result


def ci_or_slow(values, ci) -> list:
    """Parameters for pytest.mark.parametrize: those in `ci` as they are, the rest marked slow
    (run with -m slow). For variants of one behaviour whose every value would add to the
    suite's time and little to what it checks; keep in `ci` the values that differ most."""
    return [v if v in ci else pytest.param(v, marks=pytest.mark.slow) for v in values]
