"""FFA-LoRA: exact by freezing A (https://arxiv.org/abs/2403.12313).

A is drawn once from the run's seed on every node and never trained; only B (and a head) travel and are
averaged: (Σ p_k B_k) A0 = Σ p_k B_k A0 exactly. Fewer trainable parameters make it a weaker learner.
"""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, weighted_average
from pollinate.strategies.base import Aggregate, ClientSide, LoraStrategy


class FfaLora(LoraStrategy):
    """Weighted mean of B; A stays the seeded A0 everywhere."""

    client_side = ClientSide(freeze_a=True)

    def combine(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """Σ p_k B_k (replies carry no A)."""
        return Aggregate(state=weighted_average([c.to_state() for c in clients], weights))
