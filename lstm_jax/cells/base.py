"""The interface every recurrent cell implements: `Cell`, with the default scan over time."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax

Carry = Any  # A pytree of float32 [batch, ...] arrays: the state one layer carries over time.


class Cell(nn.Module):
    """A recurrent cell: its zero state, one time step, and the scan the model applies.

    A subclass is a Flax module with a `features: int` field (the width of its output) that
    implements two methods, and may override a third:

    - `init_carry(batch_size) -> carry`: the state before the first character, a pytree of
      float32 [batch_size, ...] arrays. Must be all zeros: training resets a carry with
      `zeros_like` at the start of an epoch, and checkpoints and `lstm_jax.parallel` split and
      join it along the leading (batch) axis. Decorate it with `nn.nowrap`, since the model
      calls it on an unbound module.
    - `__call__(carry, x) -> (carry, y)`: one time step, x [batch, in] -> y [batch, features].
      Sampling advances one character at a time through `scan` on sequences of length 1.
    - `scan(carry, xs) -> (carry, ys)`: the whole sequence, xs [batch, time, in] ->
      ys [batch, time, features]. This is what the model calls. The default runs `__call__`
      under `nn.scan`: parameters shared over time, a fresh dropout key at every step. A cell
      with a parallel form over time (minLSTM) overrides it; it must equal stepping `__call__`.
      The default also takes `remat=True` (`--remat`): each step is wrapped in `nn.remat`, so
      the backward pass recomputes the step from its carry and input instead of storing its
      intermediate values. Same results; less memory, a little more time. And it takes
      `unroll=N` (`--unroll`): N time steps per iteration of the loop XLA compiles.

    - `flops_per_step(input_dim) -> int`: the forward FLOPs of one time step for one sequence,
      from the cell's matmuls (a multiply-add counts 2); `lstm_jax.bench` sums it over the
      layers for the model's FLOPs per character. Call it on an unbound cell, like
      `init_carry`, so decorate it with `nn.nowrap` too.

    Four class-level hooks, all optional:

    - `recurrent_kernels`: paths (`"name/kernel"`) of the hidden-to-hidden kernels among the
      cell's parameters, which `--weight_drop` drops (DropConnect). Empty: the cell has none
      (minLSTM), and `--weight_drop` is refused for it.
    - `hoists_input`: True where `scan` takes `hoist_input=True` (`--hoist_input`: the input
      projection of all time steps as one matmul before the loop; the lstm cell). False: refused.
    - `steps_in_scan`: False for a cell whose `scan` computes all time steps at once (minLSTM);
      `--remat`, `--unroll` and `--scan=wavefront` need one that steps, and refuse it.
    - `options(model_config) -> dict`: the cell's own fields from the model settings (the
      Mogrifier's rounds and rank); the model passes them when it builds the cell.

    `__call__` is not declared here, so that a subclass can take it from a Flax cell by
    multiple inheritance (`class LSTM(Cell, nn.OptimizedLSTMCell)`).
    """

    recurrent_kernels: ClassVar[tuple[str, ...]] = ()
    hoists_input: ClassVar[bool] = False
    steps_in_scan: ClassVar[bool] = True  # False: `scan` computes all time steps at once.

    @classmethod
    def options(cls, config: Any) -> dict[str, Any]:
        """The cell's own fields, from a `ModelConfig`; most cells have none."""
        return {}

    @nn.nowrap
    def init_carry(self, batch_size: int) -> Carry:
        raise NotImplementedError(f"{type(self).__name__} must define init_carry(batch_size).")

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        """Forward FLOPs of one step for one sequence with `input_dim` input features.

        Only the matmuls are counted, at 2 FLOPs per multiply-add: a [1, n] @ [n, m] product is
        2 * n * m. Biases, nonlinearities, normalisations and the scan's elementwise updates are
        left out, as they are small next to the matmuls (linear in `features`, not quadratic).
        """
        raise NotImplementedError(f"{type(self).__name__} must define flops_per_step(input_dim).")

    def scan(
        self, carry: Carry, xs: jax.Array, remat: bool = False, unroll: int = 1
    ) -> tuple[Carry, jax.Array]:
        def step(cell, carry, x):
            return cell(carry, x)

        if remat:
            # prevent_cse=False: scan already keeps XLA from merging the recomputation away.
            step = nn.remat(step, prevent_cse=False)
        step_over_time = nn.scan(
            step,
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=1,
            out_axes=1,
            unroll=unroll,
        )
        return step_over_time(self, carry, xs)
