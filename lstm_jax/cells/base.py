"""The interface every recurrent cell implements: `Cell`, with the default scan over time."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax

from lstm_jax.errors import UsageError

Carry = Any  # A pytree of float32 [batch, ...] arrays: the state one layer carries over time.
DEFAULT_HEADS = 4  # For the cells with heads (mlstm, attention), where it divides the width.


def resolve_heads(heads: int, features: int) -> int:
    """The head count a cell uses: `heads`, or for 0 `DEFAULT_HEADS` where it divides
    `features` and one head otherwise. An explicit count that does not divide `features` is
    refused by the settings check (`Cell.refuse`) before a cell is built."""
    if heads:
        return heads
    return DEFAULT_HEADS if features % DEFAULT_HEADS == 0 else 1


def refuse_heads_that_do_not_divide(flag: str, heads: int, hidden: int) -> None:
    """One line where `--{flag}` asks for a head count that does not divide `--hidden`."""
    if heads and hidden % heads:
        raise UsageError(
            f"--{flag}={heads} must divide --hidden={hidden} (each head is hidden / heads "
            "wide); pick a divisor of --hidden, or 0 for the default."
        )


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
      `init_carry`, so decorate it with `nn.nowrap` too. A cell whose state is more than a
      vector (mlstm's matrix memory, attention's cache) counts the FLOPs of that state too,
      and says how many of them no weight makes in `state_flops_per_step()` (the memory
      estimate counts parameters as the rest over 2).

    Six class-level hooks, all optional:

    - `recurrent_kernels`: paths (`"name/kernel"`) of the hidden-to-hidden kernels among the
      cell's parameters, which `--weight_drop` drops (DropConnect). Empty: the cell has none
      (minLSTM), and `--weight_drop` is refused for it.
    - `hoists_input`: True where `scan` takes `hoist_input=True` (`--hoist_input`: the input
      projection of all time steps as one matmul before the loop; the lstm cell). False: refused.
    - `steps_in_scan`: False for a cell whose `scan` computes all time steps at once (minLSTM);
      `--remat`, `--unroll` and `--scan=wavefront` need one that steps, and refuse it.
    - `options(model_config) -> dict`: the cell's own fields from the model settings (the
      Mogrifier's rounds and rank); the model passes them when it builds the cell.
    - `settings`: the `ModelConfig` fields that only this cell reads (`mlstm_heads`, ...); any
      of them away from its default is refused in one line for every other `--cell`.
    - `refuse(config)`: raise `UsageError` for values of its settings that cannot be built (a
      head count that does not divide `--hidden`).

    `__call__` is not declared here, so that a subclass can take it from a Flax cell by
    multiple inheritance (`class LSTM(Cell, nn.OptimizedLSTMCell)`).
    """

    recurrent_kernels: ClassVar[tuple[str, ...]] = ()
    hoists_input: ClassVar[bool] = False
    steps_in_scan: ClassVar[bool] = True  # False: `scan` computes all time steps at once.
    settings: ClassVar[tuple[str, ...]] = ()  # ModelConfig fields only this cell reads.

    @classmethod
    def options(cls, config: Any) -> dict[str, Any]:
        """The cell's own fields, from a `ModelConfig`; most cells have none."""
        return {}

    @classmethod
    def refuse(cls, config: Any) -> None:
        """Raise `UsageError` for a `ModelConfig` this cell cannot be built from; most take any."""

    @nn.nowrap
    def state_flops_per_step(self) -> int:
        """The FLOPs of `flops_per_step` that no weight makes (a matrix memory, an attention
        cache); 0 for a cell whose state is a vector."""
        return 0

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
