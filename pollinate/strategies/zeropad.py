"""Zero-padding heterogeneous ranks to the largest, then FedAvg: the inexact baseline (HetLoRA-style,
https://arxiv.org/abs/2401.06432). Clients load the first r_k components of the global adapter."""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, pad_average
from pollinate.strategies.base import Aggregate, ClientSide, LoraStrategy


class ZeroPad(LoraStrategy):
    """Pad every reply to the largest rank in the round and average the factors."""

    client_side = ClientSide(truncate=True)
    heterogeneous_ranks = True

    def combine(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """The padded average at the global (largest) rank, expressed with scale alpha / r_max."""
        return Aggregate(state=pad_average(clients, weights, self.rank, self.alpha / self.rank).to_state())
