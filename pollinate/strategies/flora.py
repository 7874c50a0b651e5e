"""FLoRA: exact stacking of heterogeneous-rank adapters (https://arxiv.org/abs/2409.05976).

The stacked product Σ p_k s_k B_k A_k is merged into the base weights every round; clients merge the same
stacked factors (the downlink) and start the next round from a fresh adapter (B = 0).
Bytes per client per round and target matrix m×n: up r_k(m + n); down min(Σ_j r_j (m + n), m·n), the
previous round's stacked factors or their dense product (nothing in round 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, stack, weighted_average
from pollinate.methods.lora.update import LowRankUpdate
from pollinate.methods.lora.variants import FreshAdapter
from pollinate.strategies.base import Aggregate
from pollinate.strategies.lora import LoraStrategy


class FLora(LoraStrategy):
    """Stack, merge into the base, restart adapters from zero."""

    variant = FreshAdapter()

    def combine_factors(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """The stacked delta; only a trained head (if any) remains as adapter state."""
        return Aggregate(state=weighted_average([c.extra for c in clients], weights),
                         update=LowRankUpdate(stack(clients, weights)))

    @classmethod
    def payload_numbers(cls, shapes: Sequence[tuple[int, int]], rank: int, ranks: Sequence[int],
                        first_round: bool) -> tuple[int, int]:
        """Up r_k(m + n); down the stacked factors of every client's rank, or the dense m×n delta when
        that is fewer numbers (the downlink sends whichever is smaller)."""
        up = sum(rank * (m + n) for m, n in shapes)
        return up, 0 if first_round else sum(min(sum(ranks) * (m + n), m * n) for m, n in shapes)
