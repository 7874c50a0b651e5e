"""LoRA's update: a low-rank delta folded into the frozen base weights (FLoRA, FedEx-LoRA).

Version v of a node's base holds the deltas of the first v updates; combined deltas concatenate their
factors (or add up dense), so merging a combination equals merging its parts in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import torch

from pollinate.aggregation import BaseDelta, combine, from_flat, to_flat


@dataclass(frozen=True)
class LowRankUpdate:
    """W ← W + ΔW for every module of ``delta``."""

    delta: BaseDelta
    span: int = 1

    @classmethod
    def combine(cls, updates: Sequence[Self]) -> Self:
        """One delta equal to merging ``updates`` in order (factored or dense, whichever is smaller)."""
        return cls(combine([u.delta for u in updates]), sum(u.span for u in updates))

    def to_flat(self) -> dict[str, torch.Tensor]:
        """``<module>.L``/``.R`` or ``<module>.D`` per module."""
        return to_flat(self.delta)

    @classmethod
    def from_flat(cls, flat: Mapping[str, torch.Tensor], *, span: int = 1) -> Self:
        """The inverse of :meth:`to_flat`."""
        return cls(from_flat(flat), span)
