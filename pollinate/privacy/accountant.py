"""(ε, δ) of a run's rounds, from Google's ``dp-accounting`` (its Rényi-DP accountant).

Why this library: it is maintained, light (no deep-learning framework), and composes the events a
federation has; Flower's own accountant needs uniform weights and no client sampling, and Opacus's
brings its training stack with it. The Rényi accountant is the one the DP-FedAvg literature reports.

- ``central``: each round is the Gaussian mechanism on the sum of clipped updates (sensitivity clip
  when a client is added or removed), on clients sampled at rate q = clients-per-round / num-clients.
  The server samples a fixed number each round; it is accounted as Poisson sampling at the same rate,
  the approximation DP-FedAvg (McMahan et al., 2018) makes. With every client in every round (q = 1)
  the account is exact.
- ``local``: each upload is the Gaussian mechanism on one client's clipped update; two datasets of that
  client can move it by up to 2·clip, so σ counts half. The server sees who takes part, so sampling
  amplifies nothing: ε is that of a client that took part in every round so far.
"""

from __future__ import annotations

import logging
import math
from functools import cache
from typing import Any

from pollinate.privacy.settings import DpSettings


class Accountant:
    """ε after a number of rounds, for one run's settings."""

    def __init__(self, settings: DpSettings, num_clients: int, per_round: int) -> None:
        self.settings = settings
        self.delta = settings.delta_for(num_clients)
        self.sampling_rate = per_round / num_clients if settings.mode == "central" else 1.0

    def epsilon(self, rounds: int) -> float:
        """ε after ``rounds`` rounds (0 before any; infinite without noise)."""
        return _epsilon(self.settings.mode, self.settings.noise_multiplier, self.sampling_rate,
                        self.delta, rounds)

    def rounds_within(self, target: float, limit: int) -> int:
        """How many rounds, up to ``limit``, keep ε at or below ``target``."""
        done = 0
        while done < limit and self.epsilon(done + 1) <= target:
            done += 1
        return done


def check_target(settings: DpSettings, num_clients: int, per_round: int) -> None:
    """Raise the one-line error when ``dp.target-epsilon`` cannot allow even the first round."""
    if not settings.on or not settings.target_epsilon:
        return
    first = Accountant(settings, num_clients, per_round).epsilon(1)
    if first > settings.target_epsilon:
        raise ValueError(f"dp.target-epsilon: {settings.target_epsilon!r} is not allowed; one round already "
                         f"spends ε = {first:.3f} (dp.noise-multiplier {settings.noise_multiplier:g}, "
                         f"δ = {settings.delta_for(num_clients):.3g}): give a larger target or more noise")


def round_event(mode: str, noise: float, rate: float) -> Any:
    """One round of ``mode`` at noise multiplier ``noise`` and sampling rate ``rate``."""
    import dp_accounting  # scipy and mpmath: loaded only where ε is computed

    gaussian = dp_accounting.GaussianDpEvent(noise / (2 if mode == "local" else 1))
    return dp_accounting.PoissonSampledDpEvent(rate, gaussian) if rate < 1 else gaussian


@cache
def _epsilon(mode: str, noise: float, rate: float, delta: float, rounds: int) -> float:
    if rounds == 0:
        return 0.0
    if noise == 0:
        return math.inf
    from dp_accounting.rdp import RdpAccountant

    rdp = RdpAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "order excluded" notes: orders whose series does not converge are
    try:  # left out of the minimum over orders, which only makes ε larger (never wrong)
        rdp.compose(round_event(mode, noise, rate), rounds)
        return float(rdp.get_epsilon(delta))
    finally:
        absl.setLevel(level)


__all__ = ["Accountant", "check_target", "round_event"]
