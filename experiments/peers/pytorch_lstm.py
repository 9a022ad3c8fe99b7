"""The same character LSTM in PyTorch, as a speed peer for `python -m lstm_jax.bench`.

Embedding(vocab, embed) -> LSTM(embed, hidden, num_layers, batch_first) -> Linear(hidden, vocab),
cross-entropy at every position, Adam (lr 2e-3), gradient-norm clipping at 5, and the LSTM state
carried (detached) from one batch to the next, as lstm_jax trains by default. Batches are random
character ids made on the host, like the JAX side of the benchmark.

`lstm_jax.bench --compare=pytorch` loads this file by path, builds a `PeerTrainer` with
`build_trainer` and times windows with `PeerTrainer.train_window`. Run alone, it prints the
median training chars/s and nothing else:

    python experiments/peers/pytorch_lstm.py --hidden=512 --num_layers=2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

LEARNING_RATE = 2e-3
GRAD_CLIP = 5.0
NUM_HOST_BATCHES = 4  # Distinct random batches, cycled; the same pool size as lstm_jax.bench.


class CharLSTM(nn.Module):
    """Embedding -> stacked LSTM -> Linear, returning logits and the new (h, c) state."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers, batch_first=True)
        self.logits = nn.Linear(hidden, vocab_size)

    def forward(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        outputs, state = self.lstm(self.embed(tokens), state)
        return self.logits(outputs), state


class PeerTrainer:
    """One model, its optimizer and its carried state; `train_window` runs and times steps."""

    def __init__(
        self,
        *,
        vocab_size: int,
        embed_dim: int,
        hidden: int,
        num_layers: int,
        batch: int,
        seq_len: int,
        device: str = "cpu",
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.model = CharLSTM(vocab_size, embed_dim, hidden, num_layers).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        self.chars_per_step = batch * seq_len
        rng = np.random.default_rng(seed)
        self.host_batches = [
            rng.integers(0, vocab_size, (batch, seq_len + 1), dtype=np.int32)
            for _ in range(NUM_HOST_BATCHES)
        ]
        zeros = torch.zeros(num_layers, batch, hidden, device=self.device)
        self.state = (zeros, zeros.clone())
        self.steps_done = 0

    def _step(self) -> None:
        host_batch = self.host_batches[self.steps_done % len(self.host_batches)]
        batch = torch.from_numpy(host_batch).to(self.device, torch.long)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        state = tuple(s.detach() for s in self.state)  # Truncated BPTT: keep values, not graph.
        logits, self.state = self.model(inputs, state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.steps_done += 1

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_window(self, steps: int) -> float:
        """Run `steps` optimizer steps; return the seconds they took (device work finished)."""
        self._synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self._step()
        self._synchronize()
        return time.perf_counter() - start


def build_trainer(
    *,
    vocab_size: int,
    embed_dim: int,
    hidden: int,
    num_layers: int,
    batch: int,
    seq_len: int,
    device: str = "cpu",
    seed: int = 0,
    num_threads: int | None = None,
) -> PeerTrainer:
    """A ready `PeerTrainer`; `num_threads` (default: every CPU) goes to torch.set_num_threads."""
    torch.set_num_threads(num_threads or os.cpu_count() or 1)
    return PeerTrainer(
        vocab_size=vocab_size,
        embed_dim=embed_dim,
        hidden=hidden,
        num_layers=num_layers,
        batch=batch,
        seq_len=seq_len,
        device=device,
        seed=seed,
    )


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PyTorch character-LSTM training speed.")
    parser.add_argument("--hidden", type=int, default=512, help="LSTM units per layer.")
    parser.add_argument("--num_layers", type=int, default=2, help="Stacked LSTM layers.")
    parser.add_argument("--embed_dim", type=int, default=64, help="Character embedding size.")
    parser.add_argument("--vocab_size", type=int, default=96, help="Characters (Dracula: 96).")
    parser.add_argument("--batch", type=int, default=64, help="Sequences per step.")
    parser.add_argument("--seq_len", type=int, default=100, help="Characters per sequence.")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--windows", type=int, default=5, help="Timed windows (median).")
    parser.add_argument("--steps_per_window", type=int, default=10, help="Steps per window.")
    parser.add_argument("--device", default="cpu", help="Torch device: cpu or cuda.")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    trainer = build_trainer(
        vocab_size=args.vocab_size,
        embed_dim=args.embed_dim,
        hidden=args.hidden,
        num_layers=args.num_layers,
        batch=args.batch,
        seq_len=args.seq_len,
        device=args.device,
    )
    trainer.train_window(args.warmup_steps)
    chars_per_window = trainer.chars_per_step * args.steps_per_window
    chars_per_second = [
        chars_per_window / trainer.train_window(args.steps_per_window) for _ in range(args.windows)
    ]
    print(f"{statistics.median(chars_per_second):.0f}")


if __name__ == "__main__":
    main()
