"""Small builders the tests share: models from flat settings."""

from lstm_jax.config import Config
from lstm_jax.models import CharLSTM, build_model


def make_model(vocab_size: int, **settings) -> CharLSTM:
    """A `CharLSTM` from flat setting names; dropout 0 unless given."""
    return build_model(Config.create(**{"dropout": 0.0, **settings}), vocab_size)
