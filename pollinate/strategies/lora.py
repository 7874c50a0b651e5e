"""The LoRA family of strategies: the method is LoRA, each rule brings its client variant, its combine
and its byte formula (docs/methods.md). One file per rule sits beside this one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pollinate.aggregation import LoraFactors
from pollinate.config import RunConfig
from pollinate.methods.lora.method import LoraMethod
from pollinate.methods.lora.variants import Shared
from pollinate.protocol import ClientReport
from pollinate.strategies.base import Aggregate, PollinateStrategy, weights_of


class LoraStrategy(PollinateStrategy):
    """Base of the LoRA rules; a rule sets :attr:`variant` and implements :meth:`combine_factors`."""

    method_name = "lora"
    variant: ClassVar[Shared] = Shared()
    """How this rule's clients treat the adapter (pollinate.methods.lora.variants)."""
    exact: ClassVar[bool] = True
    """Whether the rule gives Σ p_k ΔW_k exactly (named in the error for mixed ranks)."""

    method: LoraMethod

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.rank = self.method.server_rank()  # the global adapter's rank (the largest client rank)
        self.alpha = cfg.lora.alpha

    @classmethod
    def build_method(cls, cfg: RunConfig) -> LoraMethod:
        """LoRA with this rule's client variant."""
        return LoraMethod(cfg, cls.variant)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Mixed ranks only where the rule is defined for them."""
        ranks = {cfg.lora.rank_for(i) for i in range(cfg.num_clients)}
        if len(ranks) > 1 and not cls.variant.heterogeneous:
            from pollinate.strategies import STRATEGIES  # the registry imports this module

            mixed = [n for n, c in STRATEGIES.items()
                     if issubclass(c, LoraStrategy) and c.variant.heterogeneous]
            exact = [n for n in mixed if STRATEGIES[n].exact]  # type: ignore[attr-defined]
            inexact = [n for n in mixed if n not in exact]
            raise ValueError(f"lora.ranks: {cfg.lora.ranks!r} gives clients different ranks, which strategy "
                             f"{cfg.strategy!r} cannot aggregate; allowed: equal ranks, or strategy "
                             f"{' or '.join(exact)} (exact) or {' or '.join(inexact)} (the inexact baseline)")

    def combine(self, reports: Sequence[ClientReport]) -> Aggregate:
        """Group each upload per module, then the rule."""
        clients = [LoraFactors.from_state(r.upload, self.alpha) for r in reports]
        return self.combine_factors(clients, weights_of(reports))

    def combine_factors(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """The rule: replies (grouped per module) and their weights -> the round's aggregate."""
        raise NotImplementedError

    @classmethod
    def payload_numbers(cls, shapes: Sequence[tuple[int, int]], rank: int, ranks: Sequence[int],
                        first_round: bool) -> tuple[int, int]:
        """(numbers up, numbers down) of one client of rank ``rank`` among clients of ``ranks``.

        ``shapes`` are the (m, n) of every adapted matrix; ``first_round`` means nothing is merged
        yet. Default (FedIT): up = down = r(m + n) per matrix.
        """
        up = sum(rank * (m + n) for m, n in shapes)
        return up, up
