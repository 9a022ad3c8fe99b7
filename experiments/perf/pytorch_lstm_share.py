"""Experiment: how much of PyTorch's training step is its LSTM kernel (oneDNN on CPU)?

If the `nn.LSTM` forward and backward are nearly all of PyTorch's step, then even running the
same kernel inside JAX (an XLA custom call into oneDNN) could beat PyTorch only by what the
rest of the step costs it. This times, alternately, the peer's whole training step
(`experiments/peers/pytorch_lstm.py`: embedding, LSTM, output layer, loss, clipping, Adam) and
the forward and backward of its `nn.LSTM` alone on the same shapes.

    python experiments/perf/pytorch_lstm_share.py --hidden=512 --num_layers=2
    python experiments/perf/pytorch_lstm_share.py --hidden=256 --num_layers=1

Results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lstm_jax.bench import load_peer

BATCH, SEQ_LEN, EMBED, VOCAB = 64, 100, 64, 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    options = parser.parse_args()
    peer = load_peer("pytorch")
    trainer = peer.build_trainer(
        vocab_size=VOCAB,
        embed_dim=EMBED,
        hidden=options.hidden,
        num_layers=options.num_layers,
        batch=BATCH,
        seq_len=SEQ_LEN,
        num_threads=os.cpu_count(),
    )
    lstm = trainer.model.lstm
    inputs = torch.randn(BATCH, SEQ_LEN, EMBED, requires_grad=True)
    state = tuple(torch.zeros(options.num_layers, BATCH, options.hidden) for _ in range(2))

    def lstm_alone() -> float:
        start = time.perf_counter()
        outputs, _ = lstm(inputs, state)
        outputs.sum().backward()
        return time.perf_counter() - start

    trainer.train_window(2)
    lstm_alone()
    step_seconds, lstm_seconds = [], []
    for _ in range(options.repeats):  # Alternate, so drifting machine speed hits both alike.
        step_seconds.append(trainer.train_window(1))
        lstm_seconds.append(lstm_alone())
    step, lstm_only = statistics.median(step_seconds), statistics.median(lstm_seconds)
    print(
        f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{options.num_layers} x {options.hidden}: whole step {1e3 * step:.1f} ms, nn.LSTM "
        f"forward + backward alone {1e3 * lstm_only:.1f} ms = {lstm_only / step:.0%} of the step"
    )


if __name__ == "__main__":
    main()
