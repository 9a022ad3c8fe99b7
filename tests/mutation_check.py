"""Mutation check: break the package on purpose, one bug at a time, and see that the tests notice.

    python tests/mutation_check.py                 # every mutation, one at a time
    python tests/mutation_check.py --list          # the mutations and the tests chosen for each
    python tests/mutation_check.py --only NAME ... # some of them
    python tests/mutation_check.py --jobs 2 --baseline --timeout 600 --keep

Each mutation replaces one exact snippet of a file under lstm_jax/ (the snippet must occur there
exactly once: the script refuses to start otherwise, so the list cannot silently go stale when the
code changes). For each mutation the repository's lstm_jax/, tests/, pyproject.toml and
experiments/ (and README.md and launch/, which some tests read) are copied into a fresh temporary
folder, the mutation is applied there, and

    python -m pytest -q -x -p no:cacheprovider -m "slow or not slow" <the mutation's tests>

runs in that folder with PYTHONPATH set to it, so the mutated copy is what gets imported (the
editable install of /work/main comes after PYTHONPATH on sys.path; the script proves it before it
starts, and again in every copy). Tests that start subprocesses pass their environment on, and
run them from the copy, so those import the mutated copy too.

One line per mutation: CAUGHT (a selected test failed), MISSED (all passed), NOTEST (none of its
test files exists yet, or nothing was selected), TIMEOUT or ERROR; then "N of M caught" and the
total time. The exit status is 1 unless every mutation run was caught. `--baseline` first runs
each distinct selection on an unmodified copy and stops if one fails there: a CAUGHT means
something only if the same tests pass without the mutation.

This file is not a test module (pytest collects test_*.py only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lstm_jax"
COPIED = ("lstm_jax", "tests", "pyproject.toml", "experiments")
COPIED_IF_PRESENT = ("README.md", "launch")  # test_cells reads the README, multihost launch/.
DRACULA_ENV = "LSTM_JAX_DRACULA"
DRACULA_FALLBACK = ROOT.parent / "shared" / "data" / "dracula.txt"

# Test selections. Files are named rather than single tests where the tests are still being
# written; the file most likely to catch a mutation comes first (with -x the run stops there).
REF = "tests/test_reference.py"
TRAIN = "tests/test_train.py"
DATA = "tests/test_data.py"
SAMPLE = "tests/test_sample.py"
CHECKPOINT = "tests/test_checkpoint.py"
WORKFLOWS = "tests/test_workflows.py"
NOT_DRACULA = "not on_dracula"  # test_train's 300-step Dracula run: the slowest of test_train.
STOP_AND_RESUME = f"{CHECKPOINT}::test_stop_and_resume_gives_the_parameters_of_an_uninterrupted_run"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # Under lstm_jax/.
    old: str  # Must occur exactly once in the file.
    new: str
    tests: tuple[str, ...]  # Test files or node ids, in the order pytest should run them.
    breaks: str  # What the bug does, in words.
    k: str | None = None  # A pytest -k expression, applied to the whole selection.


NUM_EPOCHS = "tests/test_cli.py::test_num_epochs_trains_the_ceiling_of_epochs_times_steps_per_epoch"
FT = "tests/test_finetune.py::test_"
FT_FASTER = FT + "fine_tuning_learns_a_new_text_faster_than_training_from_scratch"
FT_EXTEND = FT + "extend_vocab_keeps_every_learnt_parameter_and_adds_new_rows"
FT_COMMAND = FT + "the_command_line_takes_the_model_from_the_checkpoint"
FT_REFUSED = FT + "refused_starts_give_one_line_and_write_nothing"
INFO = "tests/test_info.py"
POP = "tests/test_population.py"
REG = "tests/test_regularizers.py"
DYN = "tests/test_dynamic.py"
EVAL = "tests/test_evaluate.py"
CELLS_TEST = "tests/test_cells.py"
WORKDIR = "tests/test_workdir.py"
HOSTILE = "tests/test_hostile.py"
TB_TEXT = (
    "tests/test_metrics.py::test_"
    + "tensorboard_text_holds_the_runs_settings_and_the_samples_it_logged"
)

MUTATIONS: tuple[Mutation, ...] = (
    # --- The train step ---------------------------------------------------------------------
    Mutation(
        "train_targets_not_shifted",
        "steps.py",
        "inputs, targets = batch[:, :-1], batch[:, 1:]",
        "inputs, targets = batch[:, :-1], batch[:, :-1]",
        (REF, TRAIN),
        "the training loss predicts the input character itself instead of the next one",
    ),
    Mutation(
        "train_count_is_rows",
        "steps.py",
        '"count": jnp.asarray(targets.size, jnp.float32)',
        '"count": jnp.asarray(targets.shape[0], jnp.float32)',
        (TRAIN, REF),
        "the train loss metric divides by the rows, not the characters",
        k=NOT_DRACULA,
    ),
    Mutation(
        "no_pmean_of_gradients",
        "steps.py",
        "grads = jax.lax.pmean(grads, axis_name)",
        "grads = grads",
        (TRAIN, REF),
        "each device applies its own gradient: no averaging across devices",
        k=NOT_DRACULA,
    ),
    Mutation(
        "psum_instead_of_pmean",
        "steps.py",
        "grads = jax.lax.pmean(grads, axis_name)",
        "grads = jax.lax.psum(grads, axis_name)",
        (TRAIN, REF),
        "gradients summed over devices (x device count): clipping and grad_norm change",
        k=NOT_DRACULA,
    ),
    Mutation(
        "dropout_key_not_folded_with_step",
        "steps.py",
        "jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)",
        "jax.random.wrap_key_data(state.dropout_key)",
        (REF, TRAIN),
        "the same dropout masks at every step",
        k=NOT_DRACULA,
    ),
    Mutation(
        "dropout_key_not_folded_with_device",
        "steps.py",
        "dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))",
        "dropout_key = dropout_key",
        (REF, TRAIN),
        "every device draws the same dropout masks for its rows",
        k=NOT_DRACULA,
    ),
    Mutation(
        "reset_ignored_in_train_step",
        "steps.py",
        "carry = reset_carry(carry, reset)",
        "carry = reset_carry(carry, False)",
        (REF, STOP_AND_RESUME),
        "train_step never zeroes the carry, whatever `reset` says",
    ),
    Mutation(
        "reset_inverted",
        "steps.py",
        "jnp.where(reset, jnp.zeros_like(c), c)",
        "jnp.where(reset, c, jnp.zeros_like(c))",
        (REF, TRAIN),
        "the carry is zeroed on every step except the ones that should reset",
        k=NOT_DRACULA,
    ),
    # --- Evaluation -------------------------------------------------------------------------
    Mutation(
        "eval_padding_weights_ignored",
        "steps.py",
        "losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights",
        "losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)",
        (REF,),
        "validation loss sums the padding's loss too",
    ),
    Mutation(
        "eval_count_includes_padding",
        "steps.py",
        'metrics = {"loss_sum": losses.sum(), "count": weights.sum()}',
        'metrics = {"loss_sum": losses.sum(), "count": jnp.asarray(weights.size, jnp.float32)}',
        (REF,),
        "validation loss divides by the padded size, not the real characters",
    ),
    Mutation(
        "eval_carry_not_passed_between_chunks",
        "evaluate.py",
        "carry, chunk_sums = eval_step(",
        "_, chunk_sums = eval_step(",
        (REF,),
        "every validation chunk starts from a zero state",
    ),
    Mutation(
        "eval_streams_interleaved",
        "data.py",
        "return a.reshape(num_streams, num_chunks, seq_len).transpose(1, 0, 2)",
        "return a.reshape(num_chunks, num_streams, seq_len)",
        (DATA, REF),
        "validation streams do not start where they should: chunk k+1 of a row does not "
        "continue chunk k",
    ),
    Mutation(
        "eval_streams_padding_weighted",
        "data.py",
        "weights[:num_targets] = 1.0",
        "weights[:] = 1.0",
        (DATA, REF),
        "eval_streams gives the padding weight 1",
    ),
    # --- The schedule -----------------------------------------------------------------------
    Mutation(
        "warmup_dropped",
        "steps.py",
        "warmup = min(optim.warmup_steps, max(total_steps - 1, 0))",
        "warmup = 0",
        (REF,),
        "no linear warm-up: the first steps run at the peak learning rate",
    ),
    Mutation(
        "cosine_ends_at_zero",
        "steps.py",
        "end_value=0.1 * optim.learning_rate,",
        "end_value=0.0,",
        (REF,),
        "cosine decays to 0 instead of 10% of the peak",
    ),
    Mutation(
        "cosine_decay_steps_exclude_warmup",
        "steps.py",
        "decay_steps=max(total_steps, warmup + 1),",
        "decay_steps=max(total_steps - warmup, warmup + 1),",
        (REF,),
        "cosine reaches its end value `warmup` steps early (optax counts warm-up in decay_steps)",
    ),
    # --- The optimizer ----------------------------------------------------------------------
    Mutation(
        "grad_clip_never_applied",
        "steps.py",
        "if optim.grad_clip > 0:",
        "if optim.grad_clip < 0:",
        (REF,),
        "gradient clipping is off whatever --grad_clip says",
    ),
    Mutation(
        "grad_clip_threshold_hard_coded",
        "steps.py",
        "optax.clip_by_global_norm(optim.grad_clip)",
        "optax.clip_by_global_norm(1.0)",
        (REF,),
        "clipping at a global norm of 1 instead of --grad_clip",
    ),
    Mutation(
        "grad_clip_elementwise",
        "steps.py",
        "optax.clip_by_global_norm(optim.grad_clip)",
        "optax.clip(optim.grad_clip)",
        (REF,),
        "each gradient element clipped to +-grad_clip instead of the global norm",
    ),
    Mutation(
        "weight_decay_dropped",
        "steps.py",
        "update = optax.adamw(schedule, weight_decay=optim.weight_decay)",
        "update = optax.adamw(schedule, weight_decay=0.0)",
        (REF,),
        "AdamW without weight decay",
    ),
    Mutation(
        "adam_instead_of_adamw",
        "steps.py",
        'if optim.optimizer == "adamw":',
        'if optim.optimizer == "adam":',
        (REF,),
        "--optimizer=adamw gets Adam (and adam gets AdamW)",
    ),
    # --- Carry handling ---------------------------------------------------------------------
    Mutation(
        "loop_resets_only_at_step_0",
        "train.py",
        "run.state, batch, run.carry, batcher.starts_new_epoch(step)",
        "run.state, batch, run.carry, step == 0",
        (REF, TRAIN),
        "the loop never resets the carry at later epoch boundaries (nor for independent windows)",
        k=NOT_DRACULA,
    ),
    Mutation(
        "loop_ignores_carry_state_flag",
        "data.py",
        "split_ids.train, config.seq_len, config.global_batch, config.seed, config.carry_state",
        "split_ids.train, config.seq_len, config.global_batch, config.seed",
        (REF, CHECKPOINT),
        "--carry_state=false still trains on carried contiguous streams",
    ),
    Mutation(
        "batcher_never_resets_after_first_epoch",
        "data.py",
        "return step % self.steps_per_epoch == 0 or not self.carry_state",
        "return step == 0 or not self.carry_state",
        (DATA, TRAIN, REF),
        "starts_new_epoch is true at step 0 only: the carry runs across epoch boundaries",
        k=NOT_DRACULA,
    ),
    Mutation(
        "no_reset_without_carry_state",
        "data.py",
        "return step % self.steps_per_epoch == 0 or not self.carry_state",
        "return step % self.steps_per_epoch == 0",
        (DATA, REF),
        "--carry_state=false keeps the state between independent windows",
    ),
    # --- Checkpoint restore -----------------------------------------------------------------
    Mutation(
        "resume_ignores_opt_state",
        "checkpoint.py",
        'return saved_state, restored["carry"]',
        'return saved_state.replace(opt_state=jax.tree.map(lambda x: x * 0, '
        'saved_state.opt_state)), restored["carry"]',
        (STOP_AND_RESUME, REF),
        "a resumed run restarts Adam's moments from zero",
    ),
    Mutation(
        "resume_ignores_carry",
        "resume.py",
        "carry = jax.tree.map(lambda c: np.asarray(c)[rows], restored_carry)",
        "carry = jax.tree.map(lambda c: np.zeros_like(np.asarray(c)[rows]), restored_carry)",
        (STOP_AND_RESUME, REF),
        "a resumed run starts from a zero LSTM state instead of the saved one",
    ),
    Mutation(
        "resume_ignores_step",
        "checkpoint.py",
        'return saved_state, restored["carry"]',
        'return saved_state.replace(step=saved_state.step * 0), restored["carry"]',
        (STOP_AND_RESUME, REF),
        "a resumed run's optimizer step restarts at 0 (schedule and dropout keys go wrong)",
    ),
    Mutation(
        "best_checkpoint_is_the_worst",
        "checkpoint.py",
        'best_mode="min",',
        'best_mode="max",',
        (
            f"{CHECKPOINT}::test_keeps_the_latest_and_the_best_checkpoint",
            f"{CHECKPOINT}::test_checkpoint_best_latest_and_a_step_pick_their_checkpoints"
            "_and_sample_uses_best",
        ),
        "the checkpoint with the highest validation loss is kept and resolved as 'best'",
    ),
    Mutation(
        "best_checkpoint_not_preserved",
        "checkpoint.py",
        'get_metric_fn=lambda metrics: metrics["val_loss"], reverse=True, n=1',
        'get_metric_fn=lambda metrics: metrics["val_loss"], reverse=False, n=1',
        (f"{CHECKPOINT}::test_keeps_the_latest_and_the_best_checkpoint",),
        "the checkpoint kept beside the latest ones is the worst by validation loss, not the best",
    ),
    Mutation(
        "checkpoint_best_resolves_to_latest",
        "checkpoint.py",
        'if which == "best":\n            return self.best_step()',
        'if which == "best":\n            return self.latest_step()',
        (
            f"{CHECKPOINT}::test_keeps_the_latest_and_the_best_checkpoint",
            f"{CHECKPOINT}::test_checkpoint_best_latest_and_a_step_pick_their_checkpoints"
            "_and_sample_uses_best",
        ),
        "--checkpoint=best (the sampler's default) samples from the latest step",
    ),
    # --- Sampling ---------------------------------------------------------------------------
    Mutation(
        "temperature_ignored",
        "generate.py",
        "tempered = logits / jnp.maximum(temperature, 1e-6)",
        "tempered = logits",
        (SAMPLE, REF),
        "sampling always at temperature 1",
    ),
    Mutation(
        "top_k_off_by_one",
        "generate.py",
        "logits = jnp.where(logits < kth_largest, -jnp.inf, logits)",
        "logits = jnp.where(logits <= kth_largest, -jnp.inf, logits)",
        (SAMPLE, REF),
        "top_k keeps k-1 characters (top_k=1 keeps none)",
    ),
    Mutation(
        "greedy_and_sampled_swapped",
        "generate.py",
        "return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)",
        "return jnp.where(temperature > 0, greedy, sampled).astype(jnp.int32)",
        (SAMPLE, REF),
        "temperature > 0 is greedy, temperature 0 samples",
    ),
    Mutation(
        "prompt_last_char_fed_twice",
        "generate.py",
        'carry, _ = model.apply({"params": params}, carry, prompt_ids[:, :-1])',
        'carry, _ = model.apply({"params": params}, carry, prompt_ids)',
        (SAMPLE, REF),
        "the prompt's last character is read twice before the first draw",
    ),
    Mutation(
        "same_key_every_sampling_step",
        "generate.py",
        "token = _next_token(logits[:, 0], step_key, temperature, top_k, top_p)",
        "token = _next_token(logits[:, 0], keys[0], temperature, top_k, top_p)",
        (SAMPLE, REF),
        "every character is drawn with the same random key",
    ),
    Mutation(
        "top_p_on_untempered_logits",
        "generate.py",
        "    if top_p < 1:\n        tempered = _nucleus(tempered, top_p)",
        "    if top_p < 1:\n        tempered = _nucleus(logits, top_p)"
        " / jnp.maximum(temperature, 1e-6)",
        (f"{REF}::test_top_p_frequencies_follow_the_nucleus_computed_by_hand",),
        "the nucleus is chosen from the untempered distribution",
    ),
    Mutation(
        "top_p_drops_the_character_that_reaches_p",
        "generate.py",
        "keep_sorted = before < top_p",
        "keep_sorted = before + probs < top_p",
        (f"{REF}::test_top_p_frequencies_follow_the_nucleus_computed_by_hand",),
        "the nucleus stops short of p (and is empty when the top character alone reaches it)",
    ),
    Mutation(
        "stream_restarts_the_carry_every_chunk",
        "generate.py",
        "(carry, token), tokens = _draw_chunk(",
        "(_, token), tokens = _draw_chunk(",
        (SAMPLE,),
        "streamed text forgets everything before each chunk: not the unstreamed text",
        k="stream",
    ),
    Mutation(
        "stop_missed_across_chunks",
        "generate.py",
        "max(before - len(stop) + 1, 0)",
        "before",
        (SAMPLE,),
        "a --stop string split over two streamed chunks is not seen",
        k="stop",
    ),
    Mutation(
        "stop_excluded",
        "generate.py",
        "return text if end < 0 else text[: end + len(stop)]",
        "return text if end < 0 else text[:end]",
        (SAMPLE,),
        "--stop cuts the text before the stop string, not after it as documented",
        k="stop",
    ),
    Mutation(
        "sample_command_ignores_top_p",
        "sample.py",
        "            top_p=options.top_p,\n",
        "",
        (WORKFLOWS,),
        "python -m lstm_jax.sample --top_p=... samples without it",
        k="streams_the_unstreamed",
    ),
    Mutation(
        "streamed_text_not_flushed",
        "sample.py",
        'print(row_pieces[0], end="", flush=True)',
        'print(row_pieces[0], end="")',
        (WORKFLOWS,),
        "the sample command's text waits in the stdout buffer instead of appearing as it comes",
        k="arrives",
    ),
    Mutation(
        "score_counts_padding",
        "api.py",
        "weights = (np.arange(num_chunks * SCORE_CHUNK) < len(ids) - 1).astype(np.float32)",
        "weights = np.ones(num_chunks * SCORE_CHUNK, np.float32)",
        (WORKFLOWS,),
        "lstm_jax.load(...).score counts the padding after the text",
        k="score",
    ),
    Mutation(
        "export_overwrites_a_full_folder",
        "export.py",
        "if path.is_dir() and any(path.iterdir()) and not overwrite:",
        "if False:",
        (WORKFLOWS,),
        "python -m lstm_jax.export writes into a non-empty --out without --overwrite",
        k="round_trips",
    ),
    # --- Data -------------------------------------------------------------------------------
    Mutation(
        "split_overlaps_by_one",
        "data.py",
        "return Split(ids[:val_start], ids[val_start:test_start], ids[test_start:])",
        "return Split(ids[: val_start + 1], ids[val_start:test_start], ids[test_start:])",
        (DATA,),
        "the first validation character is also trained on",
    ),
    Mutation(
        "batch_position_skips_a_character",
        "data.py",
        "starts = stream_starts[rows] + position * self.seq_len",
        "starts = stream_starts[rows] + position * (self.seq_len + 1)",
        (DATA, REF),
        "consecutive batches of a stream skip a character (the carry no longer fits the text)",
    ),
    Mutation(
        "batch_offset_constant",
        "data.py",
        "offset = np.random.default_rng([self.seed, epoch]).integers(0, self.seq_len + 1)",
        "offset = 0",
        (DATA,),
        "every epoch cuts the streams at the same offset",
    ),
    Mutation(
        "vocab_in_order_of_appearance",
        "data.py",
        'return cls("".join(sorted(set(text))))',
        'return cls("".join(dict.fromkeys(text)))',
        (DATA,),
        "vocabulary ids in order of first appearance, not sorted (old checkpoints misread)",
    ),
    # --- The step count ---------------------------------------------------------------------
    Mutation(
        "num_epochs_rounded_up",
        "steps.py",
        "max(1, math.ceil(config.optim.num_epochs * steps_per_epoch))",
        "max(1, math.ceil(config.optim.num_epochs) * steps_per_epoch)",
        (NUM_EPOCHS,),
        "--num_epochs=2.5 trains 3 epochs",
    ),
    Mutation(
        "num_epochs_read_as_steps",
        "steps.py",
        "max(1, math.ceil(config.optim.num_epochs * steps_per_epoch))",
        "max(1, math.ceil(config.optim.num_epochs))",
        (NUM_EPOCHS,),
        "--num_epochs=N trains N steps",
    ),
    # --- The model --------------------------------------------------------------------------
    Mutation(
        "sampling_model_drops_residual",
        "config.py",
        "{f.name: settings[f.name] for f in dataclasses.fields(ModelConfig)}",
        "{f.name: settings[f.name] for f in dataclasses.fields(ModelConfig)"
        ' if f.name != "residual"}',
        ("tests/test_ablations.py",),
        "the sampler rebuilds a residual model without its skip connections",
    ),
    # --- Fine-tuning, info, TensorBoard text ------------------------------------------------
    Mutation(
        "init_from_params_not_loaded",
        "finetune.py",
        "params=params, opt_state=state.tx.init(params), ema_params=ema_params",
        "opt_state=state.tx.init(state.params), ema_params=state.ema_params",
        (FT_FASTER, FT_EXTEND),
        "--init_from starts from a fresh initialisation, not the checkpoint's parameters",
    ),
    Mutation(
        "extended_vocab_sorted",
        "finetune.py",
        'return Vocab(saved_chars + "".join(new))',
        'return Vocab.from_text(saved_chars + "".join(new))',
        (FT_EXTEND,),
        "--extend_vocab sorts the new characters in among the old: learnt ids change meaning",
    ),
    Mutation(
        "grown_params_in_the_wrong_corner",
        "finetune.py",
        "out[tuple(slice(0, n) for n in old.shape)] = old",
        "out[tuple(slice(-n, None) for n in old.shape)] = old",
        (FT_EXTEND,),
        "--extend_vocab copies the learnt rows to the end of the bigger table",
    ),
    Mutation(
        "fine_tuning_resume_needs_the_source",
        "finetune.py",
        "    if not config.loop.restart:\n        own = Checkpoints(",
        "    if False:\n        own = Checkpoints(",
        (FT_EXTEND,),
        "a fine-tuning run cannot resume once the run it started from is gone",
    ),
    Mutation(
        "fine_tuning_model_flags_not_checked",
        "finetune.py",
        '    if differences:\n        raise UsageError(\n            f"The model settings come',
        '    if False:\n        raise UsageError(\n            f"The model settings come',
        (FT_REFUSED,),
        "a model flag that differs from the checkpoint's is silently ignored",
    ),
    Mutation(
        "init_from_missing_workdir_unchecked",
        "finetune.py",
        "if not workdir_path(workdir).is_dir():",
        "if False:",
        (FT_REFUSED,),
        "a missing --init_from workdir is reported as a workdir without checkpoints",
    ),
    Mutation(
        "init_from_bad_step_unchecked",
        "finetune.py",
        "if which.isdigit() and int(which) not in saved:",
        "if False:",
        (FT_REFUSED,),
        "a bad --init_from step is refused with --checkpoint's message",
    ),
    Mutation(
        "new_characters_allowed",
        "finetune.py",
        "if new and not extend:",
        "if False:",
        (FT_REFUSED,),
        "new characters without --extend_vocab are not refused",
    ),
    Mutation(
        "extend_vocab_alone_allowed",
        "checks.py",
        "if config.init.extend_vocab and not config.init.init_from:",
        "if False:",
        (FT_REFUSED,),
        "--extend_vocab without --init_from is silently ignored",
    ),
    Mutation(
        "main_does_not_prepare_fine_tuning",
        "main.py",
        "config = finetune.prepare(config, cli.given_settings(ModelConfig))",
        "pass",
        (FT_REFUSED, FT_COMMAND),
        "main writes flags.txt before refusing a fine-tuning start, and ignores the model",
    ),
    Mutation(
        "flags_txt_lacks_the_checkpoints_model",
        "main.py",
        "cli.set_flags(config.model)",
        "pass",
        (FT_COMMAND,),
        "flags.txt of a fine-tuning run holds the default model settings",
    ),
    Mutation(
        "info_marks_no_best",
        "info.py",
        "best=step == best",
        "best=False",
        (INFO,),
        "info does not mark the best checkpoint",
    ),
    Mutation(
        "info_counts_another_model",
        "info.py",
        'model = CharLSTM(model_config, len(meta["vocab"]))',
        'model = CharLSTM(model_config, len(meta["vocab"]) + 1)',
        (INFO,),
        "info counts the parameters of a model with one more character",
    ),
    Mutation(
        "tensorboard_lacks_settings",
        "metrics.py",
        'self._tensorboard.pending_text["settings"] = flag_lines(settings)',
        "pass",
        (TB_TEXT,),
        "TensorBoard gets no settings text",
    ),
    Mutation(
        "tensorboard_lacks_samples",
        "train.py",
        'run.metrics_file.write_text("sample", text, step)',
        "pass",
        (TB_TEXT,),
        "TensorBoard gets no samples",
    ),
    # --- Regularisers, the average, the split, evaluation, dynamic evaluation, Mogrifier ------
    Mutation(
        "weight_drop_one_mask_for_all_layers",
        "models.py",
        """            layer_cell = cell_type
            if train and reg.weight_drop:  # A mask of its own for every layer.
                keep_weight = _keep_probability(reg, keep, "weight_drop")
                layer_cell = _with_weight_drop(cell_type, self, keep_weight)""",
        """            layer_cell = cell_type
            if train and reg.weight_drop:  # A mask of its own for every layer.
                keep_weight = _keep_probability(reg, keep, "weight_drop")
                layer_cell = _with_weight_drop(cell_type, self.clone(), keep_weight)""",
        (REG,),
        "the weight-drop mask is drawn from a copy of the model's rngs: every layer the same",
        k="weight_drop",
    ),
    Mutation(
        "weight_drop_not_rescaled",
        "models.py",
        "holder[leaf] = jnp.where(kept, kernel / keep, 0.0).astype(kernel.dtype)",
        "holder[leaf] = jnp.where(kept, kernel, 0.0).astype(kernel.dtype)",
        (REG,),
        "kept recurrent weights are not scaled by 1 / (1 - p): training and evaluation differ",
        k="weight_drop",
    ),
    Mutation(
        "embed_dropout_per_occurrence",
        "models.py",
        "self.make_rng(\"dropout\"), kept(\"embed_dropout\"), (self.vocab_size,)",
        "self.make_rng(\"dropout\"), kept(\"embed_dropout\"), tokens.shape",
        (REG,),
        "embedding dropout draws per occurrence instead of per character",
        k="embedding",
    ),
    Mutation(
        "ema_without_warmup",
        "steps.py",
        "decay = jnp.minimum(ema_decay, (1.0 + self.step) / (10.0 + self.step))",
        "decay = ema_decay",
        (REG,),
        "the moving average starts without its warm-up",
        k="average",
    ),
    Mutation(
        "checkpoint_model_always_raw",
        "checkpoint.py",
        'which = meta.get("selected", "params")',
        'which = "params"',
        (EVAL,),
        "readers of a checkpoint take the raw parameters where the average was better",
        k="better",
    ),
    Mutation(
        "test_split_overlaps_validation",
        "data.py",
        "val_start, test_start = len(ids) - num_test - num_val, len(ids) - num_test",
        "val_start, test_start = len(ids) - num_val, len(ids) - num_test",
        (EVAL,),
        "validation is cut from the end of the text, the same text as the test",
        k="split",
    ),
    Mutation(
        "dynamic_update_before_scoring",
        "dynamic.py",
        "params, carry, segment_sum = adapt(params, carry, *chunk)",
        "params, carry, segment_sum = adapt(adapt(params, carry, *chunk)[0], carry, *chunk)",
        (DYN,),
        "each segment is scored after the weights learnt from it (seeing the answers)",
    ),
    Mutation(
        "dynamic_decay_not_capped",
        "dynamic.py",
        "return jax.tree.map(lambda r: jnp.minimum(r / mean, cap), rms)",
        "return jax.tree.map(lambda r: r / mean, rms)",
        (DYN,),
        "decay rates above 1 / decay overshoot the trained weights",
        k="decay",
    ),
    Mutation(
        "mogrifier_rounds_swapped",
        "cells/mogrifier.py",
        "            if round_ % 2:",
        "            if not round_ % 2:",
        (CELLS_TEST,),
        "the Mogrifier gates h first, then x: not the paper's order",
        k="mogrifier",
    ),
    # --- Blocks and the RG-LRU cell (issue 27, items 4 and 2) ---------------------------------
    Mutation(
        "rglru_conv_state_not_carried",
        "cells/rglru.py",
        "u = jnp.concatenate([conv_inputs, self.linear_x(xs)], axis=1)",
        "u = jnp.concatenate([0 * conv_inputs, self.linear_x(xs)], axis=1)",
        (CELLS_TEST,),
        "the RG-LRU's parallel scan forgets the conv inputs carried from the last batch",
        k="rglru",
    ),
    Mutation(
        "prenorm_mlp_replaces_the_stream",
        "blocks.py",
        "return carry, x + self._drop_branch(y)",
        "return carry, self._drop_branch(y)",
        ("tests/test_blocks.py",),
        "the prenorm block's MLP output replaces the residual stream instead of adding to it",
        k="prenorm_is",
    ),
    # --- The workdir under a hostile user (issue 16) -------------------------------------------
    Mutation(
        "lock_never_refuses",
        "workdir.py",
        "            if running:\n                raise UserError(",
        "            if False:\n                raise UserError(",
        (f"{WORKDIR}::test_a_second_claim_is_refused_naming_the_holder_and_the_first_is_released",),
        "a second trainer on a workdir runs beside the first",
    ),
    Mutation(
        "stale_lock_never_taken_over",
        "workdir.py",
        'return not self.started or _process_start(self.pid) in ("", self.started)',
        "return True",
        (WORKDIR,),
        "a lock whose PID now belongs to another process blocks the workdir for ever",
        k="stale",
    ),
    Mutation(
        "flags_txt_written_before_the_checks",
        "main.py",
        "train.train_and_evaluate(config, flagfile=cli.flagfile_text(Config))",
        "(__import__('pathlib').Path(config.loop.workdir).mkdir(parents=True, exist_ok=True), "
        "(__import__('pathlib').Path(config.loop.workdir) / 'flags.txt').write_text("
        "cli.flagfile_text(Config)), train.train_and_evaluate(config, "
        "flagfile=cli.flagfile_text(Config)))",
        (HOSTILE,),
        "a refused run rewrites the workdir's flags.txt",
        k="model",
    ),
    Mutation(
        "failed_save_is_a_traceback",
        "checkpoint.py",
        "            self._save_error = SaveFailed(self, e)\n"
        "            raise self._save_error from None",
        "            raise",
        (f"{WORKDIR}::test_a_save_that_fails_mid_run_stops_it_in_one_line_naming_the_last_safe_step",),
        "a failed background save ends the run with Orbax's tracebacks",
    ),
    Mutation(
        "half_deleted_steps_listed",
        "checkpoint.py",
        "return [step for step in self._manager.all_steps() if step not in self._partial]",
        "return list(self._manager.all_steps())",
        (WORKDIR,),
        "readers list (and pick) a checkpoint whose files are half deleted",
        k="half_deleted",
    ),
    Mutation(
        "metadata_keys_unchecked",
        "checkpoint.py",
        "missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]",
        "missing = []",
        (WORKDIR,),
        "metadata without its settings reaches the readers (a KeyError traceback)",
        k="damaged_metadata",
    ),
    Mutation(
        "second_ctrl_c_is_a_traceback",
        "stop.py",
        "            message = self._on_second_interrupt()\n"
        '            os.write(sys.stderr.fileno(), f"error: {message}\\n".encode())',
        "            raise KeyboardInterrupt\n            os.write(2, b'')",
        (f"{WORKDIR}::test_a_second_ctrl_c_stops_at_once_naming_the_step_the_next_run_resumes_from",),
        "a second Ctrl-C gives a KeyboardInterrupt traceback",
    ),
    Mutation(
        "population_members_share_one_batch_stream",
        "train.py",
        "dataclasses.replace(data.batcher, seed=m.seed) for m in members",
        "dataclasses.replace(data.batcher, seed=data.batcher.seed) for m in members",
        (f"{POP}::test_each_member_trains_as_the_single_run_of_its_settings",),
        "every member of a population reads the first seed's batches",
    ),
    Mutation(
        "population_dropout_rates_ignored",
        "steps.py",
        'keep = None if hparams is None else {"keep": hparams.keep}',
        "keep = None",
        (f"{POP}::test_each_member_trains_as_the_single_run_of_its_settings",),
        "a grid's dropout values are ignored: every member drops at the model's rate",
    ),
    Mutation(
        "grid_accepts_shape_axes",
        "population.py",
        "        if name not in GRID_AXES:",
        "        if False:",
        (f"{POP}::test_bad_population_input_is_one_line_and_writes_nothing",),
        "a grid over --hidden is accepted (and fails later, or trains one shape)",
    ),
    Mutation(
        "group_comparison_never_paired",
        "population.py",
        "    if sorted(a) == sorted(b) and len(a) > 1:",
        "    if False:",
        (f"{POP}::test_group_comparison_is_the_paired_t_interval_or_welchs",),
        "two groups with the same seeds are compared unpaired (a wider, wrong interval)",
    ),
    Mutation(
        "reader_default_member_is_the_worst",
        "reader.py",
        'return min(matching, key=lambda i: (members[i]["best_val_loss"], i))',
        'return max(matching, key=lambda i: (members[i]["best_val_loss"], i))',
        (f"{POP}::test_readers_pick_a_member_by_index_or_settings_and_default_to_the_best",),
        "sample/evaluate/export/load default to the worst member by validation",
    ),
    # --- The mLSTM and attention cells (issue 27, items 1 and 3) -------------------------------
    Mutation(
        "mlstm_forget_ignores_the_stabiliser",
        "cells/mlstm.py",
        "forget = jnp.exp(log_f + m - m_new)[..., None]",
        "forget = jnp.exp(log_f)[..., None]",
        (CELLS_TEST,),
        "the mLSTM step's forget gate ignores the max-stabiliser (C and n lose their scale)",
        k="mlstm",
    ),
    Mutation(
        "attention_mask_sees_one_step_ahead",
        "cells/attention.py",
        "allowed = (distance >= 0) & (distance < window)",
        "allowed = (distance >= -1) & (distance < window)",
        (CELLS_TEST,),
        "attention's mask lets each position see the next character (the one it predicts)",
        k="attention",
    ),
    Mutation(
        "python_api_speaks_in_flags",
        "errors.py",
        "    if _FROM_PYTHON.get():",
        "    if False:",
        (f"{WORKFLOWS}::test_the_python_api_raises_value_errors_in_pythons_words",),
        "lstm_jax.load/generate/score/export_model name their arguments as flags (--length)",
    ),
    Mutation(
        "bench_matmul_not_estimated",
        "bench.py",
        "        memory.matmul_need(matmul_side(options, platform), num_devices, "
        "config.compute.dtype),\n",
        "",
        (HOSTILE,),
        "bench --matmul_size=100000 runs the training step, then dies of an out-of-memory "
        "traceback",
        k="bench and matmul",
    ),
    # --- The cache and ensembles behind evaluate (issue 25) -----------------------------------
    Mutation(
        "cache_sees_the_predicted_character",
        "cache.py",
        "allowed = valid[None] & (positions[None] < t) & (positions[None] >= t - window)",
        "allowed = valid[None] & (positions[None] <= t) & (positions[None] >= t - window)",
        ("tests/test_cache.py",),
        "the cache holds the pair of the position it predicts, so it copies the answer",
        k="depends_on_nothing",
    ),
    Mutation(
        "ensemble_averages_log_probs",
        "ensemble.py",
        "return jax.nn.logsumexp(member_log_probs, axis=0) - math.log(count)",
        "return member_log_probs.mean(axis=0) + 0 * count",
        ("tests/test_cache.py",),
        "the ensemble is the mean of the members' log probabilities (a geometric mean, not "
        "normalised), not the mean of their probabilities",
        k="ensemble",
    ),
    Mutation(
        "ensemble_reads_only_the_first_folder",
        "evaluate.py",
        'named = [f.strip() for f in options.ensemble.split(",") if f.strip()]',
        'named = [f.strip() for f in options.ensemble.split(",") if f.strip()][:1]',
        ("tests/test_cache.py",),
        "evaluate --ensemble=W1,W2 scores W1's models alone",
        k="ensemble",
    ),
    # --- XLA:CPU's collectives with steps queued (issue 26) -----------------------------------
    Mutation(
        "pmapped_steps_queued_on_a_multi_device_cpu",
        "parallel.py",
        '    if len(devices) == 1 or devices[0].platform != "cpu":\n        return step\n',
        "    return step\n",
        ("tests/test_train.py",),
        "pmapped steps queue up on 8 CPU devices; XLA:CPU's rendezvous aborts after 40 s",
        k="many_queued",
    ),
)


# --- Checks before anything runs --------------------------------------------------------------


def check_mutations(mutations: tuple[Mutation, ...]) -> None:
    """Every snippet occurs exactly once in today's source; names are unique. Exits otherwise."""
    problems = []
    names = [m.name for m in mutations]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{name}: the name is used twice")
    for m in mutations:
        path = ROOT / PACKAGE / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {PACKAGE}/{m.file} does not exist")
            continue
        text = path.read_text()
        count = text.count(m.old)
        if count != 1:
            problems.append(
                f"{m.name}: the snippet occurs {count} times in {PACKAGE}/{m.file} (must be "
                f"exactly once): {m.old!r}"
            )
        else:
            try:  # A mutant that does not even parse would be "caught" for nothing.
                compile(text.replace(m.old, m.new), str(path), "exec")
            except SyntaxError as e:
                problems.append(f"{m.name}: the mutated file does not parse: {e}")
            else:  # Nor would one that names something undefined (a NameError, not a bug).
                undefined = _undefined_names(text.replace(m.old, m.new), path)
                if undefined:
                    problems.append(f"{m.name}: the mutant names undefined {undefined}")
        if m.old == m.new:
            problems.append(f"{m.name}: old and new are the same")
        if not m.tests:
            problems.append(f"{m.name}: no tests selected")
    if problems:
        sys.exit("The mutation list does not fit the code any more:\n  " + "\n  ".join(problems))


def _undefined_names(source: str, path: Path) -> str:
    """ruff's undefined-name findings (F821) in `source`, or "" when there are none."""
    result = subprocess.run(
        ["ruff", "check", "--no-cache", "--select", "F821", "--output-format", "concise",
         "--stdin-filename", str(path), "-"],
        input=source, capture_output=True, text=True,
    )  # fmt: skip
    return " ".join(
        line.split(": ", 1)[-1] for line in result.stdout.splitlines() if "F821" in line
    )


def make_copy(dest: Path) -> None:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache")
    for item in COPIED + COPIED_IF_PRESENT:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / item)
        elif item in COPIED:
            sys.exit(f"{src} is missing; nothing to copy.")


def apply_mutation(copy: Path, m: Mutation) -> None:
    path = copy / PACKAGE / m.file
    text = path.read_text()
    if text.count(m.old) != 1:  # Checked on the original already; the copy must agree.
        raise RuntimeError(f"{m.name}: the snippet is not exactly once in the copy {path}")
    path.write_text(text.replace(m.old, m.new))


def environment(copy: Path, cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(copy), env.get("PYTHONPATH")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # One persistent XLA cache for the commands the tests start, over the whole check: keys are
    # the compiled programs' text, so a mutated program never hits an unmutated entry. The test
    # process itself runs without one (tests/conftest.py says why).
    env.setdefault("LSTM_JAX_TEST_COMPILE_CACHE", str(cache_dir))
    if not env.get(DRACULA_ENV) and DRACULA_FALLBACK.is_file():
        env[DRACULA_ENV] = str(DRACULA_FALLBACK)
    return env


def imported_package(copy: Path, env: dict[str, str], cwd: Path) -> Path:
    """Where `import lstm_jax` resolves with this environment, run from `cwd`."""
    result = subprocess.run(
        [sys.executable, "-c", "import lstm_jax; print(lstm_jax.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"`import lstm_jax` failed in {copy}:\n{result.stderr[-2000:]}")
    return Path(result.stdout.strip()).resolve()


def check_imports_copy(copy: Path, env: dict[str, str], neutral_cwd: Path) -> None:
    """Abort unless the copy, not the editable install, is what Python imports there."""
    expected = (copy / PACKAGE / "__init__.py").resolve()
    for cwd in (copy, neutral_cwd):  # The copy as cwd (as pytest runs), and PYTHONPATH alone.
        found = imported_package(copy, env, cwd)
        if found != expected:
            sys.exit(
                f"With PYTHONPATH={copy} and cwd {cwd}, `import lstm_jax` gives {found}, not "
                f"{expected}: the mutated copy would not be tested. Aborting."
            )


# --- Running ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # CAUGHT, MISSED, NOTEST, TIMEOUT or ERROR; PASSED or FAILED for a baseline.
    seconds: float
    detail: str
    log: str = ""


_running: set[int] = set()  # Process group ids of the pytest runs in flight.
_running_lock = threading.Lock()
_print_lock = threading.Lock()


def existing_selection(copy: Path, tests: tuple[str, ...]) -> tuple[list[str], list[str]]:
    present, missing = [], []
    for t in tests:
        (present if (copy / t.split("::")[0]).exists() else missing).append(t)
    return present, missing


def run_pytest(
    copy: Path, tests: list[str], k: str | None, env: dict[str, str], basetemp: Path, timeout: float
) -> tuple[int | None, str]:
    """pytest's exit status (None on timeout) and its output."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-rfE",
        "-m",
        "slow or not slow",  # The tests marked slow too: a mutation is judged by all its tests.
        f"--basetemp={basetemp}",
        *tests,
    ]
    if k:
        command += ["-k", k]
    process = subprocess.Popen(
        command,
        cwd=copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Its own process group: a timeout ends its subprocesses too.
    )
    with _running_lock:
        _running.add(process.pid)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        output, _ = process.communicate()
        return None, output
    finally:
        with _running_lock:
            _running.discard(process.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_FAILURE = re.compile(r"^(FAILED|ERROR) (.*)$", re.M)


def first_failure(output: str) -> str:
    match = _FAILURE.search(output)
    if match:
        return f"{match.group(1)} {match.group(2)}"[:160]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:160] if lines else "(no output)"


def last_line(output: str) -> str:
    lines = [line.strip("= ") for line in output.splitlines() if line.strip()]
    return lines[-1][:160] if lines else "(no output)"


def run_one(
    m: Mutation | None,
    tests: tuple[str, ...],
    k: str | None,
    label: str,
    base: Path,
    cache_dir: Path,
    timeout: float,
    keep: bool,
) -> Outcome:
    """Copy, mutate (unless `m` is None: a baseline run), run the selection, classify."""
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=f"{label}.", dir=base))
    copy = folder / "repo"
    try:
        make_copy(copy)
        if m is not None:
            apply_mutation(copy, m)
        env = environment(copy, cache_dir)
        check_imports_copy(copy, env, folder)
        present, missing = existing_selection(copy, tests)
        note = f" (no {', '.join(missing)} yet)" if missing else ""
        if not present:
            detail = f"no selected test file exists yet: {', '.join(missing)}"
            return Outcome(label, "NOTEST", time.perf_counter() - start, detail)
        rc, output = run_pytest(copy, present, k, env, folder / "pytest_tmp", timeout)
        log = folder / "pytest.log"
        log.write_text(output)
        seconds = time.perf_counter() - start
        if rc is None:
            return Outcome(label, "TIMEOUT", seconds, f"over {timeout:.0f} s{note}", str(log))
        if rc in (1, 2):  # Tests failed, or collection broke (the mutated code did not import).
            status = "CAUGHT" if m is not None else "FAILED"
            return Outcome(label, status, seconds, first_failure(output) + note, str(log))
        if rc == 0:
            status = "MISSED" if m is not None else "PASSED"
            return Outcome(label, status, seconds, last_line(output) + note, str(log))
        if rc == 5:
            return Outcome(label, "NOTEST", seconds, "no test selected" + note, str(log))
        return Outcome(label, "ERROR", seconds, f"pytest exit {rc}: {last_line(output)}", str(log))
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def report(outcome: Outcome, keep: bool) -> None:
    line = f"{outcome.status:<8}{outcome.seconds:7.1f} s  {outcome.name:<40} {outcome.detail}"
    if keep and outcome.log:
        line += f"\n{'':17}log: {outcome.log}"
    with _print_lock:
        print(line, flush=True)


def run_all(jobs, args: argparse.Namespace, base: Path, cache_dir: Path) -> list[Outcome]:
    """Run (mutation, tests, k, label) jobs on `args.jobs` workers; report each as it ends."""
    outcomes: dict[str, Outcome] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(
                run_one, m, tests, k, label, base, cache_dir, args.timeout, args.keep
            ): label
            for m, tests, k, label in jobs
        }
        for future in concurrent.futures.as_completed(futures):
            outcome = future.result()
            outcomes[outcome.name] = outcome
            report(outcome, args.keep)
    return [outcomes[label] for *_, label in jobs]


def list_mutations(mutations: tuple[Mutation, ...]) -> None:
    for m in mutations:
        selection = " ".join(m.tests) + (f" -k '{m.k}'" if m.k else "")
        print(f"{m.name}\n    {PACKAGE}/{m.file}: {m.breaks}\n    tests: {selection}")
    print(f"{len(mutations)} mutations.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at once (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds per pytest run (default 900)"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first run each selection unmutated; stop if any fails",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the copies and pytest logs (paths printed)"
    )
    args = parser.parse_args()

    check_mutations(MUTATIONS)  # Always the whole list: it must stay honest.
    if args.list:
        list_mutations(MUTATIONS)
        return 0
    chosen = MUTATIONS
    if args.only:
        known = {m.name for m in MUTATIONS}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            sys.exit(f"Unknown mutation(s): {', '.join(unknown)}; see --list.")
        chosen = tuple(m for m in MUTATIONS if m.name in args.only)

    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="lstm_jax_mutation_"))
    cache_dir = base / "xla_cache"
    env_note = os.environ.get(DRACULA_ENV) or (
        f"{DRACULA_FALLBACK} (fallback)" if DRACULA_FALLBACK.is_file() else "unset: may download"
    )
    print(f"{len(chosen)} mutation(s), {args.jobs} at a time; {DRACULA_ENV}={env_note}")
    try:
        # The one-time proof that a copy, not the editable install, is imported.
        probe = base / "import_check"
        make_copy(probe / "repo")
        check_imports_copy(probe / "repo", environment(probe / "repo", cache_dir), probe)
        shutil.rmtree(probe)
        print(f"import check: with PYTHONPATH=<copy>, lstm_jax is imported from the copy ({base})")

        if args.baseline:
            selections = list(dict.fromkeys((m.tests, m.k) for m in chosen))
            jobs = [(None, t, k, f"baseline-{i}") for i, (t, k) in enumerate(selections)]
            print(f"baseline: {len(jobs)} selection(s) on an unmutated copy")
            outcomes = run_all(jobs, args, base, cache_dir)
            failed = False
            for (_, tests, k, _), o in zip(jobs, outcomes, strict=True):
                if o.status not in ("PASSED", "NOTEST"):
                    failed = True
                    print(f"baseline {o.status}: {' '.join(tests)} -k {k!r}: {o.detail}")
            if failed:
                print("The selections must pass without a mutation; fix that first.")
                return 2

        jobs = [(m, m.tests, m.k, m.name) for m in chosen]
        outcomes = run_all(jobs, args, base, cache_dir)
    except KeyboardInterrupt:
        with _running_lock:
            for pgid in list(_running):
                _kill_group(pgid)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    caught = sum(o.status == "CAUGHT" for o in outcomes)
    total = time.perf_counter() - started
    print(f"{caught} of {len(outcomes)} caught in {total:.0f} s", end="")
    print(f"; kept in {base}" if args.keep else "")
    not_caught = [o.name for o in outcomes if o.status != "CAUGHT"]
    if not_caught:
        print("not caught: " + ", ".join(not_caught))
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
