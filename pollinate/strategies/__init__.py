"""Flower strategies, one per file and thin: each calls a pure rule in pollinate.aggregation."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from pollinate.strategies.fedit import FedIt

STRATEGIES: dict[str, type] = {"fedit": FedIt}


def build_strategy(name: str, num_clients: int) -> Strategy:
    """The strategy called ``name``, sampling every one of ``num_clients`` clients each round.

    The server evaluates centrally on the held-out split; the round loop does not ask clients to.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy: {name!r} is not allowed; allowed: {', '.join(STRATEGIES)}")
    strategy: Strategy = STRATEGIES[name](
        fraction_train=1.0,
        min_train_nodes=num_clients,
        min_available_nodes=num_clients,  # nodes register lazily: wait for all of them
    )
    return strategy


__all__ = ["STRATEGIES", "FedIt", "build_strategy"]
