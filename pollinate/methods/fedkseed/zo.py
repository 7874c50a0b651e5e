"""Directions from seeds and the zeroth-order step (https://arxiv.org/abs/2312.06353, MeZO's estimator).

A direction z(s) ~ N(0, I) over the trained tensors is drawn from a ``torch.Generator`` of its own,
seeded with s, on the CPU in fp32, tensor by tensor in a fixed order: the same seed gives bit-identical z
in every process, and z is never stored (one temporary the size of the largest tensor at a time).
A global ``torch.manual_seed`` would not do: concurrent clients of one process share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SEED_BOUND = 1 << 62
"""Candidate seeds are drawn below this (any 64-bit value seeds a Generator)."""


def candidate_seeds(run_seed: int, k: int) -> list[int]:
    """The K candidate seeds of a run: a function of the run seed alone, so identical on every node."""
    gen = torch.Generator().manual_seed(run_seed)
    return [int(s) for s in torch.randint(0, SEED_BOUND, (k,), generator=gen, dtype=torch.int64)]


def direction(params: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """z(seed) as tensors shaped like ``params`` (for tests; the steps never hold more than one)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float32) for p in params]


@torch.no_grad()
def shift(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """w ← w + scale·z(seed), in place, drawing z one tensor at a time."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.add_(z.to(p.dtype), alpha=scale)


def replay(params: Sequence[torch.Tensor], seeds: Sequence[int], sums: torch.Tensor, lr: float) -> int:
    """w ← w − lr·Σ_s sums[s]·z(seeds[s]), one regeneration per nonzero sum; returns how many."""
    used = torch.nonzero(sums).flatten().tolist()
    for i in used:
        shift(params, seeds[i], -lr * float(sums[i]))
    return len(used)


@dataclass(frozen=True)
class StepResult:
    """One zeroth-order step: the projected gradient and the mean of the two losses."""

    grad: float
    loss: float


@torch.no_grad()
def zo_step(params: Sequence[torch.Tensor], seed: int, loss: Callable[[], float], *, epsilon: float,
            lr: float) -> StepResult:
    """w + εz → L+; w − εz → L−; g = (L+ − L−)/2ε; w ← w − lr·g·z (the restore and the step in one pass)."""
    shift(params, seed, epsilon)
    plus = loss()
    shift(params, seed, -2 * epsilon)
    minus = loss()
    grad = (plus - minus) / (2 * epsilon)
    shift(params, seed, epsilon - lr * grad)
    return StepResult(grad, (plus + minus) / 2)


class UniformSeeds:
    """FedKSeed: every candidate seed equally likely."""

    def draw(self, k: int, gen: torch.Generator) -> int:
        return int(torch.randint(k, (1,), generator=gen))


@dataclass(frozen=True)
class WeightedSeeds:
    """FedKSeed-Pro: seeds drawn by the probabilities the server sends."""

    probabilities: torch.Tensor

    def draw(self, k: int, gen: torch.Generator) -> int:
        return int(torch.multinomial(self.probabilities.to(torch.float64), 1, generator=gen))


def pro_probabilities(abs_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """softmax(minmax(mean |g| per seed)): seeds that moved the loss more are drawn more, max/min ≤ e.

    ``abs_sums`` and ``counts`` hold, per seed, Σ|g| (clipped) and how many g. Every history starts with
    one entry of 0, as the paper's, so a seed never drawn has a mean of 0.
    """
    mean = abs_sums.to(torch.float64) / (counts.to(torch.float64) + 1)
    low, high = mean.min(), mean.max()
    scaled = (mean - low) / (high - low) if high > low else torch.zeros_like(mean)
    return torch.softmax(scaled, dim=0).to(torch.float32)
