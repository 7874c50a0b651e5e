"""FedIT: FedAvg of the LoRA factors, the baseline (https://arxiv.org/abs/2305.05644).

Averaging B and A separately is not the average of the updates B A (see aggregation/fedavg.py); pollinate
keeps this strategy as the reference that the exact strategies are measured against.
Bytes per client per round and target matrix m×n: up = down = r(m + n) numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from pollinate.aggregation import LoraFactors, weighted_average
from pollinate.strategies.base import Aggregate
from pollinate.strategies.lora import LoraStrategy


class FedIt(LoraStrategy):
    """Weighted FedAvg of every trainable tensor, factors included (inexact)."""

    averages_uploads = True

    exact = False

    def combine_factors(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """Σ p_k A_k and Σ p_k B_k separately."""
        return Aggregate(state=weighted_average([c.to_state() for c in clients], weights))
