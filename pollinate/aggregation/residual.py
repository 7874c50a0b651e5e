"""FedEx-LoRA: exact aggregation by a residual folded into the base (https://arxiv.org/abs/2410.09432).

Ā = Σ p_k A_k, B̄ = Σ p_k B_k and res = Σ p_k B_k A_k − B̄ Ā. Then W + s·res + s·B̄ Ā = W + s·Σ p_k B_k A_k.
Because Σ p_k (A_k − Ā) = 0, res = Σ_{k<K} p_k (B_k − B_K)(A_k − Ā): rank ≤ (K−1)·r, so it travels
factored (m×(K−1)r and (K−1)r×n) or dense (m×n), whichever is smaller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollinate.aggregation.fedavg import normalised_weights, weighted_average
from pollinate.aggregation.lora import LoraFactors
from pollinate.aggregation.lowrank import BaseDelta, Delta


def fedex(clients: Sequence[LoraFactors], weights: Sequence[float]) -> tuple[LoraFactors, BaseDelta]:
    """(the averaged adapter Ā, B̄; the scaled residual s·res per module). Needs equal ranks and scales."""
    if len({c.rank for c in clients}) > 1:
        raise ValueError("fedex needs the same rank on every client")
    p = normalised_weights(weights)
    mean = LoraFactors(a=weighted_average([c.a for c in clients], weights),
                       b=weighted_average([c.b for c in clients], weights), scale=clients[0].scale,
                       extra=weighted_average([c.extra for c in clients], weights))
    last = clients[-1]
    residual: BaseDelta = {}
    for name in mean.modules:
        if len(clients) == 1:  # one client: its adapter is the mean, nothing is left over
            residual[name] = Delta(dense=torch.zeros_like(mean.b[name] @ mean.a[name]))
            continue
        left = torch.cat([pk * mean.scale * (c.b[name] - last.b[name])
                          for pk, c in zip(p[:-1], clients[:-1], strict=True)], dim=1)  # m×(K−1)r
        right = torch.cat([c.a[name] - mean.a[name] for c in clients[:-1]], dim=0)  # (K−1)r×n
        residual[name] = Delta(left=left, right=right).cheapest()
    return mean, residual
