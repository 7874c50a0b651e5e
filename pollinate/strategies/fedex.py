"""FedEx-LoRA: exact by a residual folded into the base (https://arxiv.org/abs/2410.09432).

The global adapter is (Ā, B̄); the residual Σ p_k B_k A_k − B̄ Ā, scaled, is merged into the base weights and
travels factored (rank ≤ (K−1)·r) or dense, whichever is fewer bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, fedex
from pollinate.strategies.base import Aggregate, LoraStrategy


class FedExLora(LoraStrategy):
    """Average A and B, and merge what averaging missed into the base."""

    def combine(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """(Ā, B̄) as the adapter, s·res as the base delta."""
        mean, residual = fedex(clients, weights)
        return Aggregate(state=mean.to_state(), base_delta=residual)
