"""FedKSeed and FedKSeed-Pro: zeroth-order federated fine-tuning on K shared seeds
(https://arxiv.org/abs/2312.06353).

Clients upload what their τ steps did as (seed index, g) pairs or K per-seed sums; the round's update is
the per-seed sums weighted by examples, G_s = Σ_k p_k Σ_{t: s_t = s} g_{k,t}. Every node replays it, so
the server's model is the weighted mean of the clients' final models exactly (to round-off), and a
node that missed rounds catches up from K numbers. Bytes per client and round: up min(8τ, 4K), down 4K.

FedKSeed-Pro also keeps, per seed, the history of |g| (clipped) and sends the sampling probabilities
softmax(minmax(mean |g|)) as the round's state (K numbers more down), so seeds that moved the loss
more are drawn more often; max/min ≤ e.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pollinate.config import RunConfig
from pollinate.methods.fedkseed.method import (
    PROBABILITIES_KEY,
    FedKSeedMethod,
    SeedSums,
    per_seed,
    uploaded_entries,
)
from pollinate.methods.fedkseed.zo import pro_probabilities
from pollinate.protocol import ClientReport
from pollinate.strategies.base import Aggregate, PollinateStrategy, refuse_client_ranks, weights_of

if TYPE_CHECKING:
    from pollinate.methods.base import Update

HISTORY_CLIP = 1000.0
"""|g| above this enters Pro's history clipped (the paper's default), so one outlier cannot dominate."""


class FedKSeed(PollinateStrategy):
    """Per-seed sums of g, weighted by examples; seeds drawn uniformly."""

    averages_uploads = True

    method_name = "fedkseed"
    method: FedKSeedMethod

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """One model for every client: no per-client LoRA ranks."""
        refuse_client_ranks(cfg, "every client steps the same tensors: set lora.rank instead")

    def combine(self, reports: Sequence[ClientReport]) -> Aggregate:
        """G_s = Σ_k p_k (client k's sum of g on seed s), p_k ∝ examples; the state for the next round."""
        k = self.cfg.fedkseed.seeds
        weights = weights_of(reports)
        whole = sum(weights)
        total = torch.zeros(k, dtype=torch.float64)
        for weight, report in zip(weights, reports, strict=True):
            index, grads = uploaded_entries(report.upload)
            total += per_seed(index, grads, k).to(torch.float64) * (weight / whole)
        return Aggregate(state=self.next_state(reports), update=SeedSums(total.to(torch.float32)))

    def next_state(self, reports: Sequence[ClientReport]) -> dict[str, torch.Tensor]:
        """What clients load next round: nothing (uniform seeds)."""
        return {}


class FedKSeedPro(FedKSeed):
    """As FedKSeed, with seeds drawn by the importance their history of |g| gives them."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        k = cfg.fedkseed.seeds
        self.abs_sums = torch.zeros(k, dtype=torch.float64)
        self.counts = torch.zeros(k, dtype=torch.float64)

    def state(self) -> dict[str, torch.Tensor]:
        """Every seed's history of |g|: its sum and count."""
        return {"abs-sums": self.abs_sums, "counts": self.counts}

    def restore(self, history: list[Update], node_versions: dict[int, int],
                state: dict[str, torch.Tensor]) -> None:
        """The history of |g| besides what every strategy restores."""
        super().restore(history, node_versions, {})
        self.abs_sums = state["abs-sums"].to(torch.float64).clone()
        self.counts = state["counts"].to(torch.float64).clone()

    def next_state(self, reports: Sequence[ClientReport]) -> dict[str, torch.Tensor]:
        """Add the round's |g| to every seed's history; send softmax(minmax(mean |g|))."""
        for report in reports:
            index, grads = uploaded_entries(report.upload)
            self.abs_sums.index_add_(0, index, grads.abs().clamp(max=HISTORY_CLIP).to(torch.float64))
            self.counts.index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64))
        return {PROBABILITIES_KEY: pro_probabilities(self.abs_sums, self.counts)}
