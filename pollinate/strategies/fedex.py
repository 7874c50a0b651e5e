"""FedEx-LoRA: exact by a residual folded into the base (https://arxiv.org/abs/2410.09432).

The global adapter is (Ā, B̄); the residual Σ p_k B_k A_k − B̄ Ā, scaled, is merged into the base weights and
travels factored (rank ≤ (K−1)·r) or dense, whichever is fewer numbers.
Bytes per client per round and target matrix m×n: up r(m + n); down r(m + n) + min((K−1)r(m + n), m·n).
"""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, fedex
from pollinate.methods.lora.update import LowRankUpdate
from pollinate.strategies.base import Aggregate
from pollinate.strategies.lora import LoraStrategy


class FedExLora(LoraStrategy):
    """Average A and B, and merge what averaging missed into the base."""

    def combine_factors(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """(Ā, B̄) as the adapter, s·res as the update."""
        mean, residual = fedex(clients, weights)
        return Aggregate(state=mean.to_state(), update=LowRankUpdate(residual))

    @classmethod
    def payload_numbers(cls, shapes: Sequence[tuple[int, int]], rank: int, ranks: Sequence[int],
                        first_round: bool) -> tuple[int, int]:
        """The mean adapter both ways, plus the residual (factored or dense) down."""
        k = len(ranks)
        up = sum(rank * (m + n) for m, n in shapes)
        residual = 0 if first_round else sum(min((k - 1) * rank * (m + n), m * n) for m, n in shapes)
        return up, up + residual
