"""lstm_jax: character-level LSTM language models in JAX/Flax.

Modules, one concern each: `config` (the run's settings), `data` (text, vocabulary, batches),
`models` (the model), `cells` (its recurrent cells, `--cell`), `train` (steps and loop), `parallel`
(pmap over devices), `distributed` (joining a multi-host job), `checkpoint` (Orbax), `sample`
(generation), `metrics` (metrics.jsonl, TensorBoard), `report` (comparing runs), `cli` and `main`
(command line).
"""
