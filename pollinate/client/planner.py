"""Fit a client's local training to its memory budget, whatever the method.

A method lists its candidate plans, most capable first, and estimates each one's peak from the model's
configuration alone (``pollinate.methods``); :func:`choose_plan` returns the first whose estimate fits
the budget with a safety margin, or refuses with the smallest budget that would do. The estimates are
checked against measured peaks by :mod:`pollinate.client.measure`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pollinate.client.budget import format_size
from pollinate.methods.plan import Estimate, Plan

if TYPE_CHECKING:
    from pollinate.methods.base import Method

__all__ = ["choose_plan", "minimum_budget", "plan_within"]


def choose_plan(plans: Sequence[Plan], estimate: Callable[[Plan], Estimate], budget: int, *,
                margin: float = 0.9, key: str = "memory budget", model: str = "the model",
                title: str = "") -> tuple[Plan, Estimate]:
    """The first plan of ``plans`` whose estimated peak fits ``margin * budget``.

    Parameters
    ----------
    plans : Sequence[Plan]
        The candidates, most capable first (a method's ``candidates``).
    estimate : Callable[[Plan], Estimate]
        The method's estimate of a plan's peak.
    budget : int
        Bytes this client may use above its runtime baseline.
    margin : float, default 0.9
        Share of the budget the estimate may fill; the rest absorbs estimation error.
    key : str, default ``"memory budget"``
        The configuration key of the budget, named in the error.
    model, title : str
        The model's and the method's names for the error (``"smollm2-135m-instruct"``, ``"LoRA"``).

    Returns
    -------
    (Plan, Estimate)
        The first fitting plan and its estimate. Deterministic.

    Raises
    ------
    ValueError
        If no plan fits: the message gives the smallest budget that would, and what it is made of.
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin: {margin!r} is not allowed; expected 0 < margin <= 1")
    if budget <= 0:
        raise ValueError(f"{key}: {budget!r} is not allowed; a memory budget must be greater than 0")
    if not plans:
        raise ValueError(f"{key}: there is no plan to choose from")
    smallest: tuple[Plan, Estimate] | None = None
    for plan in plans:
        guess = estimate(plan)
        if guess.total <= margin * budget:
            return plan, guess
        if smallest is None or guess.total < smallest[1].total:
            smallest = (plan, guess)
    assert smallest is not None
    plan, guess = smallest
    raise ValueError(f"{key}: {format_size(budget)} is too small for any {title or plan.method} plan of "
                     f"{model}; needs at least {format_size(minimum_budget(guess, margin), up=True)} "
                     f"({guess.breakdown()}; {plan.describe()}; {1 - margin:.0%} safety margin)")


def plan_within(method: Method, budget: int, client: int, *, margin: float = 0.9,
                key: str = "memory-budget") -> tuple[Plan, Estimate]:
    """The most capable plan of ``method`` for client ``client`` within ``budget``."""
    dims = method.dims()
    return choose_plan(method.candidates(dims, client), lambda p: method.estimate(dims, p), budget,
                       margin=margin, key=key, model=dims.name, title=method.title)


def minimum_budget(estimate: Estimate, margin: float) -> int:
    """The smallest budget whose ``margin`` share holds ``estimate``."""
    return math.ceil(estimate.total / margin)
