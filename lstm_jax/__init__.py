"""lstm_jax: character-level LSTM language models in JAX/Flax.

Modules, one concern each: `config` (the run's settings), `corpus` (the text: files, folders,
globs, downloads; `books` ships Dracula), `data` (vocabulary, split, batches),
`models` (the model), `cells` (its recurrent cells, `--cell`), `train` (steps and loop), `parallel`
(pmap over devices), `distributed` (joining a multi-host job), `checkpoint` (Orbax), `sample`
(generation), `metrics` (metrics.jsonl, TensorBoard), `records` (reading metrics.jsonl back),
`report` (comparing runs), `cli` and `main` (command line), `api` (`lstm_jax.load`: a trained
model from Python), `export` (safetensors), `bench` (speed) and `memory` (sizes that fit).
"""

__all__ = ["load"]


def __getattr__(name: str):
    # `lstm_jax.load`, imported on first use: `import lstm_jax` alone loads no JAX.
    if name == "load":
        from lstm_jax.api import load

        return load
    raise AttributeError(f"module 'lstm_jax' has no attribute {name!r}")
