"""Aggregation rules as pure torch functions; nothing here imports Flower."""

from pollinate.aggregation.fedavg import normalised_weights, weighted_average
from pollinate.aggregation.lora import LoraFactors
from pollinate.aggregation.lowrank import (
    BaseDelta,
    Delta,
    apply_delta,
    combine,
    fingerprint,
    from_flat,
    to_flat,
)
from pollinate.aggregation.padding import pad, pad_average, truncate
from pollinate.aggregation.residual import fedex
from pollinate.aggregation.stacking import stack

__all__ = [
    "BaseDelta",
    "Delta",
    "LoraFactors",
    "apply_delta",
    "combine",
    "fedex",
    "fingerprint",
    "from_flat",
    "normalised_weights",
    "pad",
    "pad_average",
    "stack",
    "to_flat",
    "truncate",
    "weighted_average",
]
