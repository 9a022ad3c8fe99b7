"""`mogrifier`: the Mogrifier LSTM of Melis, Kocisky and Blunsom (ICLR 2020).

Before the LSTM step, the input and the previous output gate each other in turns ("rounds"):

    x <- 2 sigmoid(Q_i h) * x     rounds 1, 3, 5, ...
    h <- 2 sigmoid(R_i x) * h     rounds 2, 4, ...

then an ordinary LSTM step on the mogrified (x, h). The factor 2 keeps the gates near 1 at
initialisation, so an untrained Mogrifier starts close to a plain LSTM. With `rank` > 0 each
Q_i and R_i is a product of two thin matrices (in -> rank -> out), as in the paper, which keeps
the parameter count near the LSTM's; 0: full-rank matrices. The paper reports its largest gains
on small corpora (PTB, enwik8 at small sizes), the case of one novel.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax.cells.base import Cell


class Mogrifier(Cell):
    """Carry: (c, h), each [batch, features]."""

    features: int
    rounds: int = 5
    rank: int = 0

    recurrent_kernels: ClassVar[tuple[str, ...]] = ("recurrent/kernel",)

    @classmethod
    def options(cls, config: Any) -> dict[str, Any]:
        return {"rounds": config.mogrifier_rounds, "rank": config.mogrifier_rank}

    @nn.nowrap
    def init_carry(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
        zeros = jnp.zeros((batch_size, self.features), jnp.float32)
        return zeros, zeros

    @nn.nowrap
    def flops_per_step(self, input_dim: int) -> int:
        lstm = 2 * 4 * self.features * (input_dim + self.features)
        # Every round is one projection between the two widths, h -> x or x -> h.
        per_round = 2 * (
            self.rank * (input_dim + self.features) if self.rank else input_dim * self.features
        )
        return lstm + self.rounds * per_round

    def _gate(self, source: jax.Array, width: int, name: str) -> jax.Array:
        if self.rank:
            source = nn.Dense(self.rank, use_bias=False, name=f"{name}_down")(source)
        return 2 * nn.sigmoid(nn.Dense(width, use_bias=False, name=name)(source))

    @nn.compact
    def __call__(
        self, carry: tuple[jax.Array, jax.Array], x: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        c, h = carry
        for round_ in range(1, self.rounds + 1):
            if round_ % 2:
                x = self._gate(h, x.shape[-1], f"q{round_}") * x
            else:
                h = self._gate(x, self.features, f"r{round_}") * h
        gates = nn.Dense(4 * self.features, name="input")(x) + nn.Dense(
            4 * self.features,
            use_bias=False,
            kernel_init=nn.initializers.orthogonal(),
            name="recurrent",
        )(h)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
        h = nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h
