"""lstm_jax: character-level LSTM language models in JAX/Flax.

Modules, one concern each: `config` (the run's settings), `data` (text, vocabulary, batches),
`models` (the LSTM), `train` (steps and loop), `parallel` (pmap over devices), `checkpoint`
(Orbax), `sample` (generation), `metrics` (metrics.jsonl), `cli` and `main` (command line).
"""
