"""Flower strategies, one per file and thin: each names its method and calls pure rules.

The strategy a run configures determines its method; both apps build the method through
:func:`method_for`, so a client always trains what the server aggregates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pollinate.config import RunConfig
from pollinate.strategies.base import Aggregate, PollinateStrategy
from pollinate.strategies.fedex import FedExLora
from pollinate.strategies.fedit import FedIt
from pollinate.strategies.fedkseed import FedKSeed, FedKSeedPro
from pollinate.strategies.fedsb import FedSb
from pollinate.strategies.ffa import FfaLora
from pollinate.strategies.flora import FLora
from pollinate.strategies.lora import LoraStrategy
from pollinate.strategies.sfprompt import SfPrompt
from pollinate.strategies.zeropad import ZeroPad

if TYPE_CHECKING:
    from pollinate.methods.base import Method

STRATEGIES: dict[str, type[PollinateStrategy]] = {
    "fedit": FedIt, "ffa": FfaLora, "flora": FLora, "fedex": FedExLora, "zeropad": ZeroPad,
    "fedsb": FedSb, "fedkseed": FedKSeed, "fedkseed-pro": FedKSeedPro, "sfprompt": SfPrompt,
}


def strategy_class(name: str) -> type[PollinateStrategy]:
    """The strategy registered as ``name``."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy: {name!r} is not allowed; allowed: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def method_for(cfg: RunConfig) -> Method:
    """The method (with its variant) that the configured strategy trains."""
    return strategy_class(cfg.strategy).build_method(cfg)


def build_strategy(cfg: RunConfig) -> PollinateStrategy:
    """The configured strategy, sampling every client each round; checks the configuration first.

    Evaluation is the round loop's, not the strategy's: on the server's held-out split, or on the nodes'
    own held-out slices (``eval-split = "clients"``).
    """
    return strategy_class(cfg.strategy)(cfg)


__all__ = ["STRATEGIES", "Aggregate", "FLora", "FedExLora", "FedIt", "FedKSeed", "FedKSeedPro", "FedSb",
           "FfaLora", "LoraStrategy", "PollinateStrategy", "SfPrompt", "ZeroPad", "build_strategy",
           "method_for", "strategy_class"]
