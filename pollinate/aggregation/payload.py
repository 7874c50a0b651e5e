"""How many numbers each strategy sends per client per round (docs: algorithms.md byte formulas).

Per target matrix of shape m×n, with client rank r_k, the round's ranks r_1..r_K and b bytes a number:
fedit up = down = b·r(m+n); ffa up = down = b·r·m (B only); flora up b·r_k(m+n), down b·Σr_j(m+n) (the
previous round's stacked factors); fedex up b·r(m+n), down b·r(m+n) + min(b·(K−1)r(m+n), b·m·n) (the
residual); zeropad up b·r_k(m+n), down b·r_max(m+n).
"""

from __future__ import annotations

from collections.abc import Sequence


def payload_numbers(strategy: str, shapes: Sequence[tuple[int, int]], rank: int,
                    ranks: Sequence[int], first_round: bool) -> tuple[int, int]:
    """(numbers up, numbers down) of one client of rank ``rank`` among clients of ``ranks``.

    ``shapes`` are the (m, n) of every adapted matrix; ``first_round`` means nothing is merged yet.
    """
    up = down = 0
    k = len(ranks)
    for m, n in shapes:
        if strategy == "ffa":
            up += rank * m
            down += rank * m
            continue
        up += rank * (m + n)
        if strategy == "flora":
            down += 0 if first_round else sum(ranks) * (m + n)
        elif strategy == "zeropad":
            down += max(ranks) * (m + n)
        elif strategy == "fedex":
            residual = 0 if first_round else min((k - 1) * rank * (m + n), m * n)
            down += rank * (m + n) + residual
        elif strategy == "fedit":
            down += rank * (m + n)
        else:
            raise ValueError(f"strategy: {strategy!r} has no payload formula")
    return up, down
