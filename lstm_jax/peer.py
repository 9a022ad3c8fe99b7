"""The PyTorch peer of `python -m lstm_jax.bench --compare=pytorch`: the same 2-layer LSTM step
in `torch` (experiments/peers/pytorch_lstm.py, loaded by path), and what it fixes.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from lstm_jax.config import Config
from lstm_jax.errors import UsageError, UserError

PEER_PATH = Path(__file__).resolve().parents[1] / "experiments" / "peers" / "pytorch_lstm.py"
PEERS = ("pytorch",)
# What the peer (experiments/peers/pytorch_lstm.py) runs whatever the flags say, so what
# --compare needs; it also needs an embedding (--embed_dim > 0).
PEER_SETTINGS = {
    "cell": "lstm", "dtype": "float32", "residual": False, "layer_norm": False,
    "tie_embeddings": False, "dropout": 0.0, "optimizer": "adam", "weight_decay": 0.0,
    "learning_rate": 2e-3, "grad_clip": 5.0, "carry_state": True,
}  # fmt: skip


def load_peer(name: str) -> ModuleType:
    """The peer's module, loaded from experiments/peers by path; `UsageError` if it cannot run."""
    if name not in PEERS:
        raise UsageError(f"Unknown peer {name!r}; known: {', '.join(PEERS)}.")
    try:
        import torch  # noqa: F401
    except ImportError as e:
        message = f"--compare=pytorch needs PyTorch, which does not import ({e})"
        raise UsageError(f"{message}: pip install -e '.[peers]'") from None
    if not PEER_PATH.is_file():
        raise UserError(f"--compare=pytorch needs {PEER_PATH}, from a checkout of the repository.")
    spec = importlib.util.spec_from_file_location("lstm_jax_peer_pytorch", PEER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_peer(peer: ModuleType, config: Config, options: Any, platform: str) -> Any:
    """The peer's trainer, on CUDA when JAX trains on a GPU and torch has CUDA, warmed up."""
    import torch

    model, data = config.model, config.data
    trainer = peer.build_trainer(
        vocab_size=options.vocab_size, embed_dim=model.embed_dim, hidden=model.hidden,
        num_layers=model.num_layers, batch=data.global_batch, seq_len=data.seq_len,
        device="cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu",
        num_threads=os.cpu_count(),
    )  # fmt: skip
    trainer.train_window(max(options.untimed_steps, 1))
    return trainer
