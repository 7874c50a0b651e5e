"""The invariants of docs/methods.md on tiny random tensors (fp64): exact rules are exact, the
baselines are not."""

import pytest
import torch

from pollinate.aggregation import (
    Delta,
    LoraFactors,
    apply_delta,
    combine,
    fedex,
    from_flat,
    normalised_weights,
    pad_average,
    stack,
    to_flat,
    truncate,
    weighted_average,
)

M, N, ALPHA = 12, 10, 16.0
MODULES = ("layer.q", "layer.v")


def _client(rank: int, gen: torch.Generator) -> LoraFactors:
    a = {m: torch.randn(rank, N, generator=gen, dtype=torch.float64) for m in MODULES}
    b = {m: torch.randn(M, rank, generator=gen, dtype=torch.float64) for m in MODULES}
    return LoraFactors(a=a, b=b, scale=ALPHA / rank)


def _clients(ranks: list[int]) -> list[LoraFactors]:
    gen = torch.Generator().manual_seed(sum(ranks))
    return [_client(r, gen) for r in ranks]


def _exact(clients: list[LoraFactors], weights: list[float], module: str) -> torch.Tensor:
    p = normalised_weights(weights)
    return sum(pk * c.delta(module) for pk, c in zip(p, clients, strict=True))  # type: ignore[return-value]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


@pytest.mark.parametrize("ranks", [[4, 4, 4], [8, 4, 2], [1, 6]])
def test_stacking_is_exact_for_any_ranks(ranks: list[int]) -> None:
    clients, weights = _clients(ranks), [5.0, 2.0, 3.0][: len(ranks)]
    delta = stack(clients, weights)
    for m in MODULES:
        assert delta[m].left is not None and delta[m].left.shape == (M, sum(ranks))
        torch.testing.assert_close(delta[m].matrix(), _exact(clients, weights, m), rtol=1e-12, atol=1e-12)


def test_zero_padding_is_inexact() -> None:
    clients, weights = _clients([8, 4, 2]), [5.0, 2.0, 3.0]
    avg = pad_average(clients, weights, rank=8, scale=ALPHA / 8)
    assert _rel(avg.delta("layer.q"), _exact(clients, weights, "layer.q")) > 1e-3


def test_truncate_then_pad_preserves_each_clients_update() -> None:
    (big,) = _clients([8])
    small = truncate(big, rank=3, scale=ALPHA / 3)
    expected = big.scale * big.b["layer.q"][:, :3] @ big.a["layer.q"][:3]
    torch.testing.assert_close(small.delta("layer.q"), expected)


def test_fedex_residual_makes_the_global_exact() -> None:
    clients, weights = _clients([4, 4, 4, 4]), [1.0, 2.0, 3.0, 4.0]
    mean, residual = fedex(clients, weights)
    w0 = {m: torch.randn(M, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
          for m in MODULES}
    merged = {m: w.clone() for m, w in w0.items()}
    apply_delta(merged, residual)
    for m in MODULES:
        global_weight = merged[m] + mean.delta(m)  # W0 + s·res + s·B̄Ā
        torch.testing.assert_close(global_weight, w0[m] + _exact(clients, weights, m),
                                   rtol=1e-12, atol=1e-12)


def test_fedex_residual_rank_and_factored_equals_dense() -> None:
    k, r = 3, 2
    clients, weights = _clients([r] * k), [1.0, 1.0, 2.0]
    mean, residual = fedex(clients, weights)
    for m in MODULES:
        d = residual[m]
        dense = sum(p * c.scale * c.b[m] @ c.a[m] for p, c in zip(normalised_weights(weights), clients,
                                                                   strict=True)) - mean.delta(m)
        torch.testing.assert_close(d.matrix(), dense, rtol=1e-12, atol=1e-12)
        assert torch.linalg.matrix_rank(d.matrix()) <= (k - 1) * r
        assert d.left is not None and d.left.shape[1] == (k - 1) * r  # (k−1)r·(m+n) < m·n here


def test_fedex_residual_goes_dense_when_that_is_smaller() -> None:
    clients = _clients([4] * 6)  # 5·4·(12+10) = 440 > 12·10 = 120 numbers
    _, residual = fedex(clients, [1.0] * 6)
    assert residual["layer.q"].dense is not None


def test_ffa_is_exact_with_a_shared_frozen_a() -> None:
    gen = torch.Generator().manual_seed(3)
    a0 = torch.randn(4, N, generator=gen, dtype=torch.float64)
    bs = [torch.randn(M, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, 3.0, 2.0]
    b_mean = weighted_average([{"b": b} for b in bs], weights)["b"]
    exact = sum(p * b @ a0 for p, b in zip(normalised_weights(weights), bs, strict=True))
    torch.testing.assert_close(b_mean @ a0, exact, rtol=1e-12, atol=1e-12)


def test_fedit_is_inexact_on_the_same_clients() -> None:
    clients, weights = _clients([4, 4, 4]), [5.0, 2.0, 3.0]
    a = weighted_average([c.a for c in clients], weights)
    b = weighted_average([c.b for c in clients], weights)
    fedit = clients[0].scale * b["layer.q"] @ a["layer.q"]
    assert _rel(fedit, _exact(clients, weights, "layer.q")) > 1e-3


def test_deltas_combine_and_survive_the_wire() -> None:
    clients = _clients([2, 2])
    rounds = [stack(clients, [1.0, 1.0]), stack(clients[::-1], [2.0, 1.0])]
    both = combine(rounds)
    for m in MODULES:
        torch.testing.assert_close(both[m].matrix(), rounds[0][m].matrix() + rounds[1][m].matrix())
    back = from_flat(to_flat(both, prefix="r2/"), prefix="r2/")
    assert set(back) == set(MODULES)
    torch.testing.assert_close(back["layer.q"].matrix(), both["layer.q"].matrix())
    dense = {"x": Delta(dense=torch.ones(2, 2))}
    assert from_flat(to_flat(dense))["x"].dense is not None
