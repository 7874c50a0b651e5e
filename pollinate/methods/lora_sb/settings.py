"""The ``[fedsb]`` settings table of Fed-SB (LoRA-SB, https://arxiv.org/abs/2502.15436). Standard library."""

from __future__ import annotations

from dataclasses import dataclass, field

from pollinate.methods.settings import AUTO, fail, key, positive, target_list

INITS = ("server", "federated")
"""Where the initial gradient comes from: a calibration slice on the server, or every client's share."""


@dataclass(frozen=True)
class FedSbSettings:
    """ΔW = B R A per target layer; B and A frozen and shared, only the r×r matrix R trains and travels."""

    rank: int = field(default=16, metadata=key("rank"))
    """r: every round sends r² numbers per target layer, up and down (16: 1 KB per layer in fp32)."""
    targets: str = field(default=AUTO, metadata=key("targets"))
    """Comma-separated module names, or "auto" for the attention projections of the model family."""
    init: str = field(default="server", metadata=key("init"))
    """``server``: the initial gradient over a calibration slice of the training pool that no client
    holds; ``federated``: each client's gradient sum over its share, added once before round 1."""
    init_examples: int = field(default=32, metadata=key("init-examples"))
    """Examples the initial gradient sums over (server) or each client contributes at most (federated)."""
    lr: float = field(default=5e-3, metadata=key("lr"))
    """Learning rate of R (AdamW)."""
    init_lr: float = field(default=2e-4, metadata=key("init-lr"))
    """η of the approximated first step Ĝ = −η·sign(ΣG) that A, B and R0 come from: a full fine-tuning
    learning rate (the step touches every weight of the target layers, so it is far below ``lr``)."""

    def __post_init__(self) -> None:
        positive("fedsb.rank", self.rank)
        positive("fedsb.init-examples", self.init_examples)
        positive("fedsb.lr", self.lr)
        positive("fedsb.init-lr", self.init_lr)
        if self.init not in INITS:
            raise fail("fedsb.init", self.init, f"allowed: {', '.join(INITS)}")

    def target_list(self, family: str) -> list[str]:
        """Module names to adapt in a model of ``family``."""
        return target_list(self.targets, family, "fedsb.targets")
