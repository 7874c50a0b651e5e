"""LoRA-SB initialisation by update approximation: the adapter starts as the best rank-r first step.

Paper: Fed-SB / LoRA-SB, https://arxiv.org/abs/2502.15436. Sum the full gradient G of each target weight W
over a few batches, approximate the first optimiser step by Ĝ = −η·sign(G) (Adam's first step is a sign step),
and take its rank-r truncated SVD Ĝ ≈ U S Vᵀ: B = U (m×r), A = Vᵀ (r×n), R0 = diag(S). Then B R0 A is the
best rank-r approximation of Ĝ (Eckart–Young), A has orthonormal rows and B orthonormal columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from pollinate.methods.lora_sb.layer import Factors, SbLinear


def target_gradients(model: nn.Module, layers: Mapping[str, SbLinear],
                     batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Σ over ``batches`` of ∂loss/∂W for the base weight W (m×n) of each layer in ``layers``.

    Each batch is passed as ``model(**batch)`` and its ``.loss`` (a per-batch mean) is differentiated. The
    model runs in its current mode (call ``model.eval()`` first for a gradient without dropout). The base
    weights require grad only while this runs; no ``.grad`` of any parameter is written.

    Returns
    -------
    dict[str, torch.Tensor]
        fp32 gradient sums keyed like ``layers``, each of the base weight's shape (m×n).
    """
    weights = {name: layer.base.weight for name, layer in layers.items()}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    before = {name: w.requires_grad for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            loss = model(**batch).loss
            # autograd.grad returns the gradients instead of accumulating .grad: nothing else is kept.
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for name, grad in zip(weights, grads, strict=True):
                if grad is not None:  # a layer the loss does not reach contributes zero
                    sums[name].add_(grad.to(torch.float32))  # (m, n)
    finally:
        for name, w in weights.items():
            w.requires_grad_(before[name])
    return sums


def init_factors(grad_sums: Mapping[str, torch.Tensor], rank: int, lr: float) -> dict[str, Factors]:
    """(A, B, R0) for each layer from its summed gradient G: the rank-r truncated SVD of Ĝ = −lr·sign(G).

    Parameters
    ----------
    grad_sums
        Σ ∂loss/∂W per layer, each m×n (as from :func:`target_gradients`).
    rank
        r, at most min(m, n) for every layer.
    lr
        η, the effective learning rate of the approximated first step; it sets the size of R0.

    Returns
    -------
    dict[str, tuple[Tensor, Tensor, Tensor]]
        Per layer, fp32: A (r×n, orthonormal rows), B (m×r, orthonormal columns), R0 = diag(S[:r]) (r×r),
        so that B R0 A is the rank-r truncation of Ĝ (the scale s = 1 of the paper). Deterministic: the
        sign ambiguity of the SVD is fixed (see :func:`_fix_signs`).
    """
    if not lr > 0 or lr == float("inf"):
        raise ValueError(f"fedsb.lr: {lr} is not allowed; allowed: a finite number > 0")
    factors = {}
    for name, grad in grad_sums.items():
        if not 1 <= rank <= min(grad.shape):
            raise ValueError(f"fedsb.rank: {rank} is out of range for {name} of shape "
                             f"{tuple(grad.shape)}; allowed: 1 to {min(grad.shape)}")
        g_hat = -lr * torch.sign(grad.to(torch.float64))  # (m, n); fp64 so the SVD is accurate
        factors[name] = _truncated_svd(g_hat, rank)
    return factors


def _truncated_svd(g_hat: torch.Tensor, rank: int) -> Factors:
    """(A, B, R0) in fp32 with B R0 A the rank-r truncated SVD of ``g_hat`` (m×n, fp64)."""
    u, s, vh = torch.linalg.svd(g_hat, full_matrices=False)  # (m, k), (k,), (k, n); k = min(m, n)
    b, a = _fix_signs(u[:, :rank], vh[:rank])  # (m, r), (r, n)
    r0 = torch.diag(s[:rank])  # (r, r)
    return a.to(torch.float32), b.to(torch.float32), r0.to(torch.float32)


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (column i of U, row i of Vᵀ) so that the largest-|.| entry of U's column is positive.

    u_i s_i v_iᵀ = (−u_i) s_i (−v_i)ᵀ, so the product is unchanged while the factors become unique (up to
    ties in |u|, where the first maximal entry decides, and repeated singular values).
    """
    rows = u.abs().argmax(dim=0)  # (r,): row of the largest |entry| in each column
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])  # (r,), never 0 for a unit column
    return u * signs, vh * signs[:, None]  # (m, r) · (r,) ; (r, n) · (r, 1)
