"""Tune dynamic evaluation on validation, then score the test text once with the best settings.

    python experiments/dynamic_sweep.py runs/dracula_wd [--checkpoint=best] [--member=K] \\
        [--lrs=1e-5,2e-5,4e-5,8e-5] [--decays=0,0.002,0.01] [--segment=50]

Gradient statistics come from the run's training text (as `python -m lstm_jax.evaluate
--dynamic` measures them); every (lr, decay) pair of the grid scores the validation text, and
the pair with the lowest validation loss scores the test text. Prints a table and, last, the
line `test (dynamic evaluation): X.XXXX bpc ...` with the chosen pair. The same number comes
from `python -m lstm_jax.evaluate --workdir=W --dynamic --dynamic_lr=LR --dynamic_decay=D`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from lstm_jax.cli import user_errors
from lstm_jax.data import Batcher, load_split
from lstm_jax.dynamic import DynamicEvaluator, gradient_rms
from lstm_jax.evaluate import run_data_config, score_ids
from lstm_jax.reader import restore_model as restore
from lstm_jax.steps import bits_per_char


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument(
        "--member", default="", help="A population's member (index or settings); empty: the best."
    )
    parser.add_argument("--lrs", default="1e-5,2e-5,4e-5,8e-5")
    parser.add_argument("--decays", default="0,0.002,0.01")
    parser.add_argument("--segment", type=int, default=50)
    parser.add_argument("--stat_batches", type=int, default=40)
    parser.add_argument("--val_fraction", type=float, help="Override the run's (see below).")
    parser.add_argument("--test_fraction", type=float)
    args = parser.parse_args()

    model, params, vocab, step, meta = restore(args.workdir, args.checkpoint, args.member)
    # A run trained before --test_fraction with --val_fraction=0.15 trained on exactly the text
    # that 0.05 / 0.1 leave for training: override its split to score it on today's.
    overrides = {k: getattr(args, k) for k in ("val_fraction", "test_fraction")}
    data = dataclasses.replace(
        run_data_config(meta), **{k: v for k, v in overrides.items() if v is not None}
    )
    _, split, _ = load_split(data, lambda _: vocab)
    started = time.perf_counter()
    batcher = Batcher(split.train, data.seq_len, data.global_batch, data.seed, data.carry_state)
    rms = gradient_rms(model, params, batcher, args.stat_batches)
    print(f"checkpoint step {step} ({meta.get('selected', 'params')}); gradient RMS over "
          f"{args.stat_batches} batches: {time.perf_counter() - started:.0f} s")  # fmt: skip
    evaluator = DynamicEvaluator(model, params, rms)
    static_val = score_ids(model, params, split.val)
    print(f"static: val {bits_per_char(static_val):.4f} bpc")
    results = {}
    for lr in (float(v) for v in args.lrs.split(",")):
        for decay in (float(v) for v in args.decays.split(",")):
            started = time.perf_counter()
            loss, _ = evaluator.score(split.val, lr=lr, decay=decay, segment=args.segment)
            results[lr, decay] = loss
            print(f"lr {lr:g} decay {decay:g}: val {bits_per_char(loss):.4f} bpc "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    lr, decay = min(results, key=results.get)
    started = time.perf_counter()
    static_test = score_ids(model, params, split.test)
    loss, count = evaluator.score(split.test, lr=lr, decay=decay, segment=args.segment)
    seconds = time.perf_counter() - started
    print(f"static: test {bits_per_char(static_test):.4f} bpc")
    print(
        f"test (dynamic evaluation, lr {lr:g}, decay {decay:g}, segments of {args.segment}, "
        f"chosen on validation): {bits_per_char(loss):.4f} bpc ({loss:.4f} nats/char, "
        f"{count:,} characters; {seconds:.0f} s)"
    )


if __name__ == "__main__":
    with user_errors():  # A missing or damaged workdir: one line, no traceback.
        main()
