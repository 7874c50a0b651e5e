"""Flower strategies, one per file and thin: each calls a pure rule in pollinate.aggregation."""

from __future__ import annotations

from pollinate.config import RunConfig
from pollinate.strategies.base import ClientSide, LoraStrategy
from pollinate.strategies.fedex import FedExLora
from pollinate.strategies.fedit import FedIt
from pollinate.strategies.ffa import FfaLora
from pollinate.strategies.flora import FLora
from pollinate.strategies.zeropad import ZeroPad

STRATEGIES: dict[str, type[LoraStrategy]] = {
    "fedit": FedIt, "ffa": FfaLora, "flora": FLora, "fedex": FedExLora, "zeropad": ZeroPad,
}


def strategy_class(name: str) -> type[LoraStrategy]:
    """The strategy registered as ``name``."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy: {name!r} is not allowed; allowed: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def global_rank(cfg: RunConfig) -> int:
    """The rank of the server's adapter: the largest client rank."""
    return max(cfg.lora.rank_for(i) for i in range(cfg.num_clients))


def build_strategy(cfg: RunConfig) -> LoraStrategy:
    """The configured strategy, sampling every client each round; checks the ranks fit the rule.

    The server evaluates centrally on the held-out split; the round loop does not ask clients to.
    """
    cls = strategy_class(cfg.strategy)
    ranks = sorted({cfg.lora.rank_for(i) for i in range(cfg.num_clients)}, reverse=True)
    if len(ranks) > 1 and not cls.heterogeneous_ranks:
        exact = [n for n, c in STRATEGIES.items() if c.heterogeneous_ranks and n != "zeropad"]
        raise ValueError(f"lora.ranks: {cfg.lora.ranks!r} gives clients different ranks, which strategy "
                         f"{cfg.strategy!r} cannot aggregate; allowed: equal ranks, or strategy "
                         f"{' or '.join(exact)} (exact) or zeropad (the inexact baseline)")
    return cls(rank=global_rank(cfg), alpha=cfg.lora.alpha, num_clients=cfg.num_clients)


__all__ = ["STRATEGIES", "ClientSide", "FLora", "FedExLora", "FedIt", "FfaLora", "LoraStrategy",
           "ZeroPad", "build_strategy", "global_rank", "strategy_class"]
