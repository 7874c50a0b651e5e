"""The ``[fedkseed]`` settings table of FedKSeed (https://arxiv.org/abs/2312.06353). Standard library."""

from __future__ import annotations

from dataclasses import dataclass, field

from pollinate.methods.settings import fail, key, positive

PARAMS = ("lora", "full")
"""What the zeroth-order steps move: the tensors of a LoRA adapter at ``lora.rank``, or every weight."""
MAX_SEEDS = 1 << 24
"""K at most 2^24: a seed index travels exactly in an fp32 or int32 slot either way."""


@dataclass(frozen=True)
class FedKSeedSettings:
    """Zeroth-order steps along directions drawn from K shared seeds; (seed, scalar) pairs travel."""

    seeds: int = field(default=4096, metadata=key("seeds"))
    """K candidate seeds, derived from the run seed and identical on every node."""
    steps: int = field(default=12, metadata=key("steps"))
    """τ zeroth-order steps per client and round (each two forward passes on one batch)."""
    epsilon: float = field(default=1e-3, metadata=key("epsilon"))
    """ε of the perturbation w ± εz."""
    lr: float = field(default=2e-4, metadata=key("lr"))
    """η of the step w ← w − η·g·z."""
    params: str = field(default="lora", metadata=key("params"))
    """``lora``: the tensors of a LoRA adapter at ``lora.rank`` (cheap on a CPU); ``full``: every weight,
    as the paper."""

    def __post_init__(self) -> None:
        positive("fedkseed.seeds", self.seeds)
        positive("fedkseed.steps", self.steps)
        positive("fedkseed.epsilon", self.epsilon)
        positive("fedkseed.lr", self.lr)
        if self.seeds > MAX_SEEDS:
            raise fail("fedkseed.seeds", self.seeds, f"it must be at most {MAX_SEEDS}")
        if self.params not in PARAMS:
            raise fail("fedkseed.params", self.params, f"allowed: {', '.join(PARAMS)}")
