"""Weighted averaging of state dicts: FedAvg (https://arxiv.org/abs/1602.05629).

Applied to LoRA factors this is FedIT (https://arxiv.org/abs/2305.05644), the baseline: it averages B and A
separately, so the product of the means, mean(B)·mean(A), carries cross terms B_i A_j that no client learned
and differs from the mean of the products. The exact strategies exist to remove that error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """p_k = w_k / Σ w_j; every weight must be finite and positive."""
    if not weights or any(not w > 0 or w == float("inf") for w in weights):
        raise ValueError(f"weights must be finite and positive, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Σ_k p_k · state_k per key, accumulated in fp64 and returned in each key's dtype.

    All states must have the same keys and shapes (checked; nothing is broadcast).
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    p = normalised_weights(weights)
    keys = list(states[0])
    for state in states[1:]:
        if list(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            raise ValueError("states differ in keys or shapes; plain averaging needs identical ones")
    out = {}
    for key in keys:
        total = torch.zeros_like(states[0][key], dtype=torch.float64)
        for pk, state in zip(p, states, strict=True):
            total.add_(state[key], alpha=pk)  # in place, no fp64 copy of the input: one pass per client
        out[key] = total.to(states[0][key].dtype)
    return out
