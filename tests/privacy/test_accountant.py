"""The accountant (pollinate.privacy.accountant) against dp-accounting's own computation and against a
published figure worked out by hand."""

import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant, rdp_privacy_accountant
from mpmath import binomial, exp, log, mp, mpf

from pollinate.privacy.accountant import Accountant, check_target
from pollinate.privacy.settings import DpSettings


def library_epsilon(event: dp_accounting.DpEvent, rounds: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("mode", "clients", "per_round", "sigma", "event"), [
    ("central", 10, 3, 1.1, dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(1.1))),
    ("central", 10, 10, 0.8, dp_accounting.GaussianDpEvent(0.8)),
    ("central", 100, 0, 2.0, dp_accounting.GaussianDpEvent(2.0)),  # 0: every client
    # local: one client's two datasets move its clipped update by up to 2·clip, so σ counts half; the
    # server sees who takes part, so sampling amplifies nothing
    ("local", 10, 3, 3.0, dp_accounting.GaussianDpEvent(1.5)),
])
def test_epsilon_is_the_librarys_own(mode: str, clients: int, per_round: int, sigma: float,
                                     event: dp_accounting.DpEvent) -> None:
    accountant = Accountant(DpSettings(mode=mode, noise_multiplier=sigma), clients, per_round or clients)
    assert accountant.delta == 1 / clients
    for rounds in (1, 7, 50):
        assert accountant.epsilon(rounds) == pytest.approx(library_epsilon(event, rounds, 1 / clients),
                                                           rel=1e-12)
    assert accountant.epsilon(0) == 0.0
    assert [accountant.epsilon(r) for r in range(1, 6)] == sorted(accountant.epsilon(r) for r in range(1, 6))


def sampled_gaussian_rdp(q: float, sigma: float, order: int) -> float:
    """Rényi DP at integer ``order`` of the Poisson-sampled Gaussian mechanism, from its closed form
    (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", §3.3):
    log(Σ_k C(α,k) (1−q)^(α−k) q^k exp((k² − k) / 2σ²)) / (α − 1)."""
    mp.dps = 50
    total = sum(binomial(order, k) * (1 - mpf(q)) ** (order - k) * mpf(q) ** k
                * exp(mpf(k * k - k) / (2 * sigma * sigma)) for k in range(order + 1))
    return float(log(total) / (order - 1))


def test_a_published_figure_by_hand_and_by_the_library() -> None:
    """Opacus's documented example: 60,000 examples, batches of 256, σ = 1.12, 60 epochs, δ = 1e-5,
    orders 10, 20, 100 -> (2.95, 1e-5)-DP with Mironov's conversion ε = min_α RDP(α) + log(1/δ)/(α−1).
    The closed form above reproduces it; dp-accounting's RDP at those orders is the same, and the tighter
    conversion it applies (Canonne, Kamath, Steinke 2020) only lowers ε."""
    q, sigma, delta, orders = 256 / 60000, 1.12, 1e-5, [10, 20, 100]
    steps = int(60 / q)
    rdp = [steps * sampled_gaussian_rdp(q, sigma, a) for a in orders]
    classic = min(r + math.log(1 / delta) / (a - 1) for r, a in zip(rdp, orders, strict=True))
    assert classic == pytest.approx(2.95, abs=0.01)
    library = RdpAccountant(orders=orders)
    library.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    tighter, _ = rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)
    assert library.get_epsilon(delta) == pytest.approx(tighter, rel=1e-9) and tighter < classic


def test_no_noise_spends_everything_and_targets_count_rounds() -> None:
    assert Accountant(DpSettings(mode="central", noise_multiplier=0.0), 4, 4).epsilon(1) == math.inf
    accountant = Accountant(DpSettings(mode="central", noise_multiplier=1.0), 10, 3)
    within = accountant.rounds_within(1.0, 50)
    assert accountant.epsilon(within) <= 1.0 < accountant.epsilon(within + 1)
    assert accountant.rounds_within(1e6, 8) == 8


def test_a_target_the_first_round_exceeds_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^dp\.target-epsilon: 0\.5 is not allowed; one round already "
                                         r"spends ε = 0\.989"):
        check_target(DpSettings(mode="central", noise_multiplier=1.0, target_epsilon=0.5), 4, 4)
    check_target(DpSettings(mode="central", noise_multiplier=1.0, target_epsilon=1.0), 4, 4)
    check_target(DpSettings(mode="off", target_epsilon=1e-9), 4, 4)  # nothing to spend


def test_pollinate_dp_prints_epsilon_per_round(capsys: pytest.CaptureFixture[str]) -> None:
    from pollinate.cli import main

    assert main(["dp", "--set", "dp.mode=central", "num-clients=10", "clients-per-round=3", "rounds=12",
                 "dp.target-epsilon=2"]) == 0
    out = capsys.readouterr().out
    accountant = Accountant(DpSettings(mode="central"), 10, 3)
    stop = accountant.rounds_within(2.0, 12)
    assert f"{accountant.epsilon(stop):.3f}" in out and f"stops the run after round {stop} of 12" in out
    assert main(["dp", "--set", "dp.mode=central", "strategy=flora"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pollinate: error: dp.mode: 'central' is not allowed with strategy 'flora'; "
                          "allowed with fedit, fedkseed, fedkseed-pro, fedsb, ffa")
