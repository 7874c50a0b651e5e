"""FLoRA: exact stacking of heterogeneous-rank adapters (https://arxiv.org/abs/2409.05976).

The stacked product Σ p_k s_k B_k A_k is merged into the base weights every round; clients merge the same
stacked factors (the downlink) and start the next round from a fresh adapter (B = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, stack, weighted_average
from pollinate.strategies.base import Aggregate, ClientSide, LoraStrategy


class FLora(LoraStrategy):
    """Stack, merge into the base, restart adapters from zero."""

    client_side = ClientSide(fresh_adapter=True)
    heterogeneous_ranks = True

    def combine(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """The stacked delta; only a trained head (if any) remains as adapter state."""
        return Aggregate(state=weighted_average([c.extra for c in clients], weights),
                         base_delta=stack(clients, weights))
