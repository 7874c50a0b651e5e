"""Low-rank deltas folded into frozen base weights: W ← W + L R, per adapted module.

FLoRA and FedEx-LoRA both merge part of each round's aggregate into the base weights; clients must merge
the same thing to stay in sync. A delta travels factored (L: m×k, R: k×n, the scale folded into L) or
dense (m×n), whichever is fewer numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Delta:
    """ΔW of one module: ``left @ right`` when factored, ``dense`` otherwise."""

    left: torch.Tensor | None = None  # m×k
    right: torch.Tensor | None = None  # k×n
    dense: torch.Tensor | None = None  # m×n

    def matrix(self) -> torch.Tensor:
        """The m×n update."""
        if self.dense is not None:
            return self.dense
        assert self.left is not None and self.right is not None
        return self.left @ self.right

    @property
    def shape(self) -> tuple[int, ...]:
        """m, n of the update, without forming it (a dense delta of a vector: its one dimension)."""
        if self.dense is not None:
            return tuple(self.dense.shape)
        assert self.left is not None and self.right is not None
        return self.left.shape[0], self.right.shape[1]

    def numel(self) -> int:
        """Numbers on the wire."""
        if self.dense is not None:
            return self.dense.numel()
        assert self.left is not None and self.right is not None
        return self.left.numel() + self.right.numel()

    def cheapest(self) -> Delta:
        """This delta factored or dense, whichever has fewer numbers."""
        if self.dense is not None or self.left is None or self.right is None:
            return self
        m, k = self.left.shape
        n = self.right.shape[1]
        return Delta(dense=self.matrix()) if m * n < k * (m + n) else self


BaseDelta = dict[str, Delta]  # module name -> its delta


def combine(deltas: list[BaseDelta]) -> BaseDelta:
    """Several rounds' deltas as one, factored by concatenation or dense, whichever is smaller."""
    out: BaseDelta = {}
    for name in deltas[0]:
        parts = [d[name] for d in deltas]
        if all(p.dense is None for p in parts):
            left = torch.cat([p.left for p in parts if p.left is not None], dim=1)
            right = torch.cat([p.right for p in parts if p.right is not None], dim=0)
            out[name] = Delta(left=left, right=right).cheapest()
        else:
            out[name] = Delta(dense=sum((p.matrix() for p in parts[1:]), parts[0].matrix()))
    return out


def apply_delta(weights: Mapping[str, torch.Tensor], delta: BaseDelta) -> None:
    """W += ΔW in place for every module of ``delta`` (``weights`` maps module name -> W, m×n)."""
    for name, d in delta.items():
        w = weights[name]
        w.add_(d.matrix().to(w.dtype))


def to_flat(delta: BaseDelta, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flat tensors for the wire: ``<prefix><module>.L``/``.R`` or ``.D``."""
    flat: dict[str, torch.Tensor] = {}
    for name, d in delta.items():
        if d.dense is not None:
            flat[f"{prefix}{name}.D"] = d.dense
        else:
            assert d.left is not None and d.right is not None
            flat[f"{prefix}{name}.L"], flat[f"{prefix}{name}.R"] = d.left, d.right
    return flat


def from_flat(flat: Mapping[str, torch.Tensor], prefix: str = "") -> BaseDelta:
    """The inverse of :func:`to_flat` for the keys under ``prefix``."""
    out: BaseDelta = {}
    for key in flat:
        if not key.startswith(prefix):
            continue
        name, part = key[len(prefix):].rsplit(".", 1)
        if part == "D":
            out[name] = Delta(dense=flat[key])
        elif part == "L":
            out[name] = Delta(left=flat[key], right=flat[f"{prefix}{name}.R"])
    return out


def fingerprint(weights: Mapping[str, torch.Tensor]) -> float:
    """Σ over modules of ‖W‖² + uᵀ W v (u, v fixed ±-patterns): equal bases give equal values.

    Cheap (one matrix-vector product per module) and sensitive to any change a merge makes, so a server
    can check that a client trained on the same base without receiving the weights. Taken in fp64 over
    blocks of rows, so the temporaries stay near 8 MB even for an embedding table (FedKSeed's full
    mode fingerprints every weight on an inference-sized device).
    """
    total = 0.0
    for w in weights.values():
        matrix = w.detach().reshape(w.shape[0], -1)  # a vector as one column
        v = (torch.arange(matrix.shape[1], dtype=torch.float64) % 5) - 2
        rows = max(_FINGERPRINT_BLOCK // matrix.shape[1], 1)
        for start in range(0, matrix.shape[0], rows):
            block = matrix[start : start + rows].to(torch.float64)
            u = (torch.arange(start, start + block.shape[0], dtype=torch.float64) % 7) - 3
            total += float((block * block).sum() + u @ block @ v)
    return total


_FINGERPRINT_BLOCK = 1 << 20
"""Numbers per fp64 block of :func:`fingerprint`."""
