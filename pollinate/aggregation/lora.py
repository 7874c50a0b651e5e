"""A LoRA state dict seen per module: A (r×n), B (m×r) and the scale s = alpha / r.

peft names a factor ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``; any other trainable tensor
(a classification head) is kept aside in ``extra`` and averaged plainly by every rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraFactors:
    """One adapter: ``a[module]`` r×n, ``b[module]`` m×r, ``scale`` s, other tensors in ``extra``."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    scale: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], alpha: float) -> LoraFactors:
        """Group a peft state dict; the rank (and so the scale) is read from the A shapes."""
        a = {k[: -len(A_SUFFIX)]: v for k, v in state.items() if k.endswith(A_SUFFIX)}
        b = {k[: -len(B_SUFFIX)]: v for k, v in state.items() if k.endswith(B_SUFFIX)}
        extra = {k: v for k, v in state.items() if not k.endswith((A_SUFFIX, B_SUFFIX))}
        ranks = {v.shape[0] for v in a.values()}
        if len(ranks) > 1:
            raise ValueError(f"adapter state: modules have different ranks {sorted(ranks)}")
        rank = ranks.pop() if ranks else 1
        return cls(a=a, b=b, scale=alpha / rank, extra=extra)

    @property
    def modules(self) -> list[str]:
        """Adapted module names, in state order."""
        return list(self.a)

    @property
    def rank(self) -> int:
        """r, the rank of every module."""
        return next(iter(self.a.values())).shape[0]

    def to_state(self) -> dict[str, torch.Tensor]:
        """Back to peft key names."""
        state = {f"{m}{A_SUFFIX}": self.a[m] for m in self.a}
        state.update({f"{m}{B_SUFFIX}": self.b[m] for m in self.b})
        return {**state, **self.extra}

    def delta(self, module: str) -> torch.Tensor:
        """s · B A of ``module`` (m×n)."""
        return self.scale * self.b[module] @ self.a[module]

    def norm(self) -> float:
        """‖s·B·A‖ (Frobenius) over every module without forming B·A: ‖BA‖² = tr((BᵀB)(AAᵀ)), r×r each,
        in fp64. B·c with A/c has the same norm."""
        total = 0.0
        for module, a in self.a.items():
            a64, b64 = a.to(torch.float64), self.b[module].to(torch.float64)
            total += float(torch.trace((b64.T @ b64) @ (a64 @ a64.T)))
        return self.scale * max(total, 0.0) ** 0.5
