"""FLoRA: exact aggregation of heterogeneous-rank LoRA by stacking (https://arxiv.org/abs/2409.05976).

B_stack = [p_1 s_1 B_1 | ... | p_K s_K B_K] (m × Σr_k), A_stack = [A_1; ...; A_K] (Σr_k × n), so
B_stack A_stack = Σ_k p_k s_k B_k A_k exactly, whatever the ranks. The product is merged into the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollinate.aggregation.fedavg import normalised_weights
from pollinate.aggregation.lora import LoraFactors
from pollinate.aggregation.lowrank import BaseDelta, Delta


def stack(clients: Sequence[LoraFactors], weights: Sequence[float]) -> BaseDelta:
    """The exact Σ p_k s_k B_k A_k of every module, as stacked factors (scale and weight in L)."""
    p = normalised_weights(weights)
    return {
        name: Delta(
            left=torch.cat([pk * c.scale * c.b[name] for pk, c in zip(p, clients, strict=True)], dim=1),
            right=torch.cat([c.a[name] for c in clients], dim=0),
        )
        for name in clients[0].modules
    }
