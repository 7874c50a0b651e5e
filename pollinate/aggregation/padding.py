"""Zero-padding heterogeneous ranks to the largest and averaging: the inexact baseline (HetLoRA-style).

Each client's factors are padded with zeros to r_max (B rescaled so s_k B_k A_k is preserved), then B and A
are averaged separately. Besides FedIT's cross terms, padding mixes the clients' rank components
arbitrarily; a test shows the relative error against Σ p_k s_k B_k A_k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollinate.aggregation.fedavg import weighted_average
from pollinate.aggregation.lora import LoraFactors


def pad(client: LoraFactors, rank: int, scale: float) -> LoraFactors:
    """``client`` at ``rank`` ≥ its own, expressed with ``scale``: zero rows of A, zero columns of B."""
    r = client.rank
    a = {m: torch.cat([v, v.new_zeros(rank - r, v.shape[1])]) for m, v in client.a.items()}
    b = {m: torch.cat([v * (client.scale / scale), v.new_zeros(v.shape[0], rank - r)], dim=1)
         for m, v in client.b.items()}
    return LoraFactors(a=a, b=b, scale=scale, extra=client.extra)


def truncate(global_: LoraFactors, rank: int, scale: float) -> LoraFactors:
    """The first ``rank`` components of ``global_``, re-expressed with ``scale`` (what a client loads)."""
    a = {m: v[:rank].clone() for m, v in global_.a.items()}
    b = {m: v[:, :rank] * (global_.scale / scale) for m, v in global_.b.items()}
    return LoraFactors(a=a, b=b, scale=scale, extra=global_.extra)


def pad_average(clients: Sequence[LoraFactors], weights: Sequence[float], rank: int,
                scale: float) -> LoraFactors:
    """Pad every client to ``rank`` and average A and B separately (inexact)."""
    padded = [pad(c, rank, scale) for c in clients]
    return LoraFactors.from_state(
        weighted_average([p.to_state() for p in padded], weights), alpha=scale * rank)
