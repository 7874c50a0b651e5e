"""FFA-LoRA: exact by freezing A (https://arxiv.org/abs/2403.12313).

A is drawn once from the run's seed on every node and never trained; only B (and a head) travel and are
averaged: (Σ p_k B_k) A0 = Σ p_k B_k A0 exactly. Fewer trainable parameters make it a weaker learner.
Bytes per client per round and target matrix m×n: up = down = r·m numbers (B only).
"""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, weighted_average
from pollinate.methods.lora.variants import FrozenA
from pollinate.strategies.base import Aggregate
from pollinate.strategies.lora import LoraStrategy


class FfaLora(LoraStrategy):
    """Weighted mean of B; A stays the seeded A0 everywhere."""

    averages_uploads = True

    variant = FrozenA()

    def combine_factors(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """Σ p_k B_k (replies carry no A)."""
        return Aggregate(state=weighted_average([c.to_state() for c in clients], weights))

    @classmethod
    def payload_numbers(cls, shapes: Sequence[tuple[int, int]], rank: int, ranks: Sequence[int],
                        first_round: bool) -> tuple[int, int]:
        """B only: r·m each way."""
        numbers = sum(rank * m for m, _ in shapes)
        return numbers, numbers
