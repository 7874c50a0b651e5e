"""Zero-padding heterogeneous ranks to the largest, then FedAvg: the inexact baseline (HetLoRA-style,
https://arxiv.org/abs/2401.06432). Clients load the first r_k components of the global adapter.
Bytes per client per round and target matrix m×n: up r_k(m + n); down r_max(m + n)."""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, pad_average
from pollinate.methods.lora.variants import Truncated
from pollinate.strategies.base import Aggregate
from pollinate.strategies.lora import LoraStrategy


class ZeroPad(LoraStrategy):
    """Pad every reply to the largest rank in the round and average the factors."""

    variant = Truncated()
    exact = False

    def combine_factors(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """The padded average at the global (largest) rank, expressed with scale alpha / r_max."""
        return Aggregate(state=pad_average(clients, weights, self.rank, self.alpha / self.rank).to_state())

    @classmethod
    def payload_numbers(cls, shapes: Sequence[tuple[int, int]], rank: int, ranks: Sequence[int],
                        first_round: bool) -> tuple[int, int]:
        """Up at the client's rank, down at the largest."""
        return (sum(rank * (m + n) for m, n in shapes), sum(max(ranks) * (m + n) for m, n in shapes))
