"""FedAvg of states, and why it is the wrong rule for LoRA factors (docs/methods.md, "fedit")."""

import pytest
import torch

from pollinate.aggregation import normalised_weights, weighted_average


def test_weighted_average_matches_hand_computation() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    avg = weighted_average([a, b], [1, 3])  # p = 0.25, 0.75
    torch.testing.assert_close(avg["w"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(avg["b"], torch.tensor([[3.0]]))
    assert avg["w"].dtype == torch.float32


@pytest.mark.parametrize("weights", [[1, 0], [1, -2], [float("nan"), 1], [float("inf"), 1], []])
def test_bad_weights_are_refused(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        normalised_weights(weights)


def test_mismatched_shapes_are_never_broadcast() -> None:
    with pytest.raises(ValueError, match="shapes"):
        weighted_average([{"w": torch.zeros(4, 8)}, {"w": torch.zeros(1, 8)}], [1, 1])


def test_fedit_on_lora_factors_is_inexact() -> None:
    """mean(B)·mean(A) != mean(B·A): the cross terms B_i A_j leak in (relative error ≫ 1e-3)."""
    gen = torch.Generator().manual_seed(0)
    m, n, r, k = 16, 12, 4, 5
    states = [{"A": torch.randn(r, n, generator=gen, dtype=torch.float64),
               "B": torch.randn(m, r, generator=gen, dtype=torch.float64)} for _ in range(k)]
    weights = [3, 1, 2, 5, 4]
    avg = weighted_average(states, weights)
    p = normalised_weights(weights)
    exact = sum(pk * s["B"] @ s["A"] for pk, s in zip(p, states, strict=True))
    error = torch.linalg.norm(avg["B"] @ avg["A"] - exact) / torch.linalg.norm(exact)
    assert error > 1e-3
    # ... while averaging the products themselves is exact to round-off.
    products = weighted_average([{"d": s["B"] @ s["A"]} for s in states], weights)["d"]
    torch.testing.assert_close(products, exact, rtol=1e-12, atol=1e-12)
