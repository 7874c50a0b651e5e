"""Fed-SB aggregation: R ← Σ_k p_k R_k, exact and independent of the number of clients.

Paper: Fed-SB, https://arxiv.org/abs/2502.15436.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pollinate.aggregation.fedavg import weighted_average
from pollinate.methods.lora_sb.layer import R_KEY


def average_r(states: Sequence[Mapping[str, torch.Tensor]],
              weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of the clients' R matrices, per module.

    Why this is exact: B (m×r) and A (r×n) are frozen and identical on every client, so R ↦ s·B R A is
    linear and s·B (Σ_k p_k R_k) A = Σ_k p_k s·B R_k A. The averaged adapter is exactly the weighted mean of
    the clients' updates ΔW_k, with no cross terms B_i A_j (which FedIT's mean(B)·mean(A) has), and the
    result is again of the form B R A, so it stays rank ≤ r. The payload is r² numbers per module whatever the
    number of clients. The sum is accumulated in fp64 by
    :func:`~pollinate.aggregation.fedavg.weighted_average`.

    Parameters
    ----------
    states
        One R state per client, keyed ``<module>.sb_R`` (as from
        :func:`~pollinate.methods.lora_sb.layer.r_state`); same keys and shapes in each.
    weights
        w_k > 0 per client (e.g. its number of examples); p_k = w_k / Σ w_j.

    Returns
    -------
    dict[str, torch.Tensor]
        Σ_k p_k R_k per key, each r×r in the input dtype.

    Raises
    ------
    ValueError
        If a key is not an R, or the states differ in keys or shapes, or a weight is not finite and positive.
    """
    if not states:
        raise ValueError("average_r: no client states to average")
    others = sorted(k for k in states[0] if not k.endswith(f".{R_KEY}"))
    if others:
        raise ValueError(f"average_r: only <module>.{R_KEY} keys are averaged, got {others[:3]}")
    return weighted_average(states, weights)
