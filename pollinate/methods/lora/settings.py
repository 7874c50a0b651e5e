"""The ``[lora]`` settings table (https://arxiv.org/abs/2106.09685). Standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field

from pollinate.methods.settings import AUTO, fail, key, positive, target_list


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters."""

    rank: int = field(default=8, metadata=key("rank"))
    """Rank r of every adapter (overridden per client by ``ranks``)."""
    alpha: float = field(default=16.0, metadata=key("alpha"))
    """Scale numerator: ΔW = (alpha / r) · B A."""
    targets: str = field(default=AUTO, metadata=key("targets"))
    """Comma-separated module names, or "auto" for the attention projections of the model family."""
    ranks: str = field(default="", metadata=key("ranks"))
    """One rank per client, comma-separated (heterogeneous ranks); empty means ``rank`` everywhere."""
    dropout: float = field(default=0.0, metadata=key("dropout"))
    """Dropout on the adapter input; 0 keeps training deterministic."""

    def __post_init__(self) -> None:
        positive("lora.rank", self.rank)
        positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise fail("lora.dropout", self.dropout, "allowed: 0 <= dropout < 1")
        for r in self.rank_list():
            positive("lora.ranks", r)

    def rank_list(self) -> list[int]:
        """The per-client ranks from ``ranks``, empty when every client uses ``rank``."""
        try:
            return [int(x) for x in self.ranks.split(",") if x.strip()]
        except ValueError:
            raise fail("lora.ranks", self.ranks, "give integers separated by commas") from None

    def rank_for(self, client: int) -> int:
        """The rank of client ``client`` (0-based)."""
        ranks = self.rank_list()
        return ranks[client % len(ranks)] if ranks else self.rank

    def target_list(self, family: str) -> list[str]:
        """Module names to adapt in a model of ``family`` (``"llama"``, ``"bert"``, ...)."""
        return target_list(self.targets, family, "lora.targets")
