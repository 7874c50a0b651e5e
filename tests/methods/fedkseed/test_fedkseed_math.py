"""FedKSeed's invariants on tiny tensors (../shared/docs/algorithms.md, "FedKSeed")."""

import hashlib
import math
import subprocess
import sys

import pytest
import torch

from pollinate.methods.fedkseed.method import (
    GRAD_KEY,
    INDEX_KEY,
    SUMS_KEY,
    SeedSums,
    per_seed,
    upload_form,
    uploaded_entries,
)
from pollinate.methods.fedkseed.zo import (
    UniformSeeds,
    WeightedSeeds,
    candidate_seeds,
    direction,
    pro_probabilities,
    replay,
    shift,
    zo_step,
)

SHAPES = [(5, 3), (7,), (2, 4, 3)]


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in SHAPES]


def _digest(tensors: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()


def test_the_same_seed_gives_bit_identical_directions_in_two_processes() -> None:
    seed = candidate_seeds(7, 16)[3]
    here = _digest(direction(_params(), seed))
    code = ("import hashlib, torch; from pollinate.methods.fedkseed.zo import direction; "
            f"ps = [torch.zeros(s) for s in {SHAPES!r}]; "
            f"z = direction(ps, {seed}); "
            "print(hashlib.sha256(b''.join(t.numpy().tobytes() for t in z)).hexdigest())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here
    assert _digest(direction(_params(), seed + 1)) != here


def test_candidate_seeds_depend_on_the_run_seed_only() -> None:
    assert candidate_seeds(3, 64) == candidate_seeds(3, 64)
    assert candidate_seeds(3, 64)[:10] == candidate_seeds(3, 10)
    assert candidate_seeds(3, 64) != candidate_seeds(4, 64)
    assert len(set(candidate_seeds(3, 4096))) == 4096


def test_perturb_and_restore_return_every_weight_to_round_off() -> None:
    params, before = _params(), [p.clone() for p in _params()]
    for scale in (1e-3, -2e-3, 1e-3):
        shift(params, 11, scale)
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p, b, rtol=0, atol=1e-6)
        assert not torch.equal(direction([p], 11)[0], torch.zeros_like(p))


def test_a_step_projects_the_gradient_on_its_direction() -> None:
    """L(w) = ½‖w‖² gives (L(w+εz) − L(w−εz))/2ε = ⟨w, z⟩ exactly, and the step is w − η g z."""
    params = _params(torch.float64)
    start = [p.clone() for p in params]
    z = direction(params, 5)

    def loss() -> float:
        return 0.5 * float(sum((p * p).sum() for p in params))

    result = zo_step(params, 5, loss, epsilon=1e-3, lr=0.1)
    expected = float(sum((w * d.double()).sum() for w, d in zip(start, z, strict=True)))
    assert result.grad == pytest.approx(expected, rel=1e-9)
    for p, w, d in zip(params, start, z, strict=True):
        torch.testing.assert_close(p, w - 0.1 * result.grad * d.double(), rtol=0, atol=1e-12)


def test_replay_from_per_seed_sums_equals_the_sequential_updates() -> None:
    """fp64: the steps one by one, and one regeneration per seed of their per-seed sums."""
    seeds = candidate_seeds(0, 8)
    gen = torch.Generator().manual_seed(1)
    index = torch.randint(8, (20,), generator=gen)  # seeds repeat
    grads = torch.randn(20, generator=gen, dtype=torch.float64)
    sequential, replayed = _params(torch.float64), _params(torch.float64)
    for i, g in zip(index.tolist(), grads.tolist(), strict=True):
        shift(sequential, seeds[i], -0.01 * g)
    sums = torch.zeros(8, dtype=torch.float64).index_add_(0, index, grads)
    assert replay(replayed, seeds, sums, 0.01) == len(set(index.tolist()))
    for a, b in zip(sequential, replayed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_combined_updates_replay_as_the_updates_in_turn() -> None:
    seeds = candidate_seeds(0, 8)
    u1, u2 = SeedSums(torch.tensor([0.0, 1.0, 0, 0, -2.0, 0, 0, 0])), SeedSums(torch.arange(8.0) - 3)
    one_by_one, together = _params(torch.float64), _params(torch.float64)
    replay(one_by_one, seeds, u1.sums, 0.01)
    replay(one_by_one, seeds, u2.sums, 0.01)
    both = SeedSums.combine([u1, u2])
    assert both.span == 2
    replay(together, seeds, SeedSums.from_flat(both.to_flat(), span=2).sums, 0.01)
    for a, b in zip(one_by_one, together, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("steps", "k", "form"),
                         [(200, 4096, {INDEX_KEY, GRAD_KEY}), (600, 1024, {SUMS_KEY})])
def test_the_upload_is_the_fewer_bytes_of_pairs_and_sums(steps: int, k: int, form: set[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    index, grads = torch.randint(k, (steps,), generator=gen), torch.randn(steps, generator=gen)
    flat = upload_form(index, grads, k)
    assert set(flat) == form
    assert sum(t.numel() * t.element_size() for t in flat.values()) == min(8 * steps, 4 * k)
    back_index, back_grads = uploaded_entries(flat)
    torch.testing.assert_close(per_seed(back_index, back_grads, k), per_seed(index, grads, k))


def test_pro_probabilities_favour_larger_gradients_within_a_ratio_of_e() -> None:
    gen = torch.Generator().manual_seed(0)
    abs_sums = torch.rand(4096, generator=gen, dtype=torch.float64) * 50
    counts = torch.randint(0, 5, (4096,), generator=gen).double()
    abs_sums[counts == 0] = 0
    p = pro_probabilities(abs_sums, counts)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(p.max() / p.min()) <= math.e * (1 + 1e-5)
    mean = abs_sums / (counts + 1)
    assert int(p.argmax()) == int(mean.argmax()) and int(p.argmin()) == int(mean.argmin())
    uniform = pro_probabilities(torch.zeros(8), torch.zeros(8))
    torch.testing.assert_close(uniform, torch.full((8,), 1 / 8))


def test_weighted_seeds_follow_their_probabilities() -> None:
    gen = torch.Generator().manual_seed(0)
    probabilities = torch.tensor([0.0, 0.7, 0.3, 0.0])
    draws = [WeightedSeeds(probabilities).draw(4, gen) for _ in range(400)]
    assert set(draws) == {1, 2} and 0.6 < draws.count(1) / 400 < 0.8
    assert set(UniformSeeds().draw(4, gen) for _ in range(200)) == {0, 1, 2, 3}
