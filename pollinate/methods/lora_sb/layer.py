"""LoRA-SB layers: ΔW = s · B R A with B and A frozen, R (r×r) the only trainable matrix.

Paper: Fed-SB / LoRA-SB, https://arxiv.org/abs/2502.15436. B (m×r) and A (r×n) are set once by the
initialisation (:mod:`pollinate.methods.lora_sb.init`) and are identical on every client, so they are buffers:
they never get a gradient and never show in ``parameters()``. Only the r² numbers of each R train and travel.
Every tensor name carries the ``sb_`` prefix, so state dicts filter by name:
``<module>.sb_R`` (trainable), ``<module>.sb_A`` and ``<module>.sb_B`` (frozen, sent once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pollinate.methods.base import check_state

R_KEY, A_KEY, B_KEY = "sb_R", "sb_A", "sb_B"
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (A r×n, B m×r, R r×r)


class SbLinear(nn.Module):
    """A frozen ``nn.Linear`` plus s · B R A; adds nothing until :meth:`install` is called.

    Parameters
    ----------
    base
        The layer to adapt, weight W of shape (m×n) = (out×in); it stays frozen.
    rank
        r, the side of the square trainable matrix R.
    scale
        s; the paper uses s = 1 (alpha = r), which is what
        :func:`~pollinate.methods.lora_sb.init.init_factors` assumes when it sets R0 = diag(S).

    Notes
    -----
    ``installed`` is a plain attribute, not state: ``load_state_dict`` does not set it; use :meth:`install`
    (or :func:`install_factors`) to give a layer its factors.
    """

    sb_A: torch.Tensor
    sb_B: torch.Tensor

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, scale
        device = base.weight.device
        self.register_buffer(A_KEY, torch.zeros(rank, base.in_features, device=device))  # (r, n)
        self.register_buffer(B_KEY, torch.zeros(base.out_features, rank, device=device))  # (m, r)
        self.sb_R = nn.Parameter(torch.zeros(rank, rank, device=device))  # (r, r)
        self.installed = False

    def install(self, a: torch.Tensor, b: torch.Tensor, r0: torch.Tensor) -> None:
        """Copy in A (r×n), B (m×r) and the initial R (r×r), as fp32; from then on the adapter counts."""
        for key, value in ((A_KEY, a), (B_KEY, b), (R_KEY, r0)):
            current: torch.Tensor = getattr(self, key)
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"lora-sb install: {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(current.shape)}")
            with torch.no_grad():
                current.copy_(value.to(torch.float32))
        self.installed = True

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B R A, shape (m×n) like the base weight, fp32 (zeros before :meth:`install`)."""
        return self.scale * self.sb_B @ self.sb_R @ self.sb_A  # (m, r) @ (r, r) @ (r, n) -> (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = W x + b + s · B R A x; the adapter term runs in the factors' dtype (fp32 unless the model was
        cast) and is cast back to y's dtype."""
        y = self.base(x)  # (..., m)
        if not self.installed:
            return y
        h = x.to(self.sb_A.dtype) @ self.sb_A.T  # (..., n) @ (n, r) -> (..., r)
        h = h @ self.sb_R.T  # (..., r)
        return y + (self.scale * (h @ self.sb_B.T)).to(y.dtype)  # (..., r) @ (r, m) -> (..., m)


def wrap(model: nn.Module, targets: Sequence[str], rank: int) -> dict[str, SbLinear]:
    """Replace every ``nn.Linear`` whose last name component is in ``targets`` by an :class:`SbLinear`.

    Every other parameter of ``model`` is frozen, so afterwards only the R matrices require grad.

    Returns
    -------
    dict[str, SbLinear]
        The new layers by module name (``model.named_modules()`` names), in model order.

    Raises
    ------
    ValueError
        If a target matches no linear layer, the rank is out of range, or ``model`` is already wrapped.
    """
    if sb_layers(model):
        raise ValueError("fedsb: the model already has LoRA-SB layers; wrap a fresh model")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    _check_targets(linears, targets)
    chosen = {name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets}
    _check_rank(chosen, rank)
    model.requires_grad_(False)
    for name, linear in chosen.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, SbLinear(linear, rank))
    return sb_layers(model)


def sb_layers(model: nn.Module) -> dict[str, SbLinear]:
    """Every :class:`SbLinear` of ``model`` by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SbLinear)}


def r_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable payload: a detached fp32 copy of each R (r×r), keyed ``<module>.sb_R``."""
    return {f"{name}.{R_KEY}": m.sb_R.detach().to(torch.float32).clone()
            for name, m in sb_layers(model).items()}


def load_r_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the R matrices; it must hold exactly the keys of :func:`r_state`, each r×r."""
    layers = sb_layers(model)
    check_state(state, {f"{name}.{R_KEY}": (m.rank, m.rank) for name, m in layers.items()}, "lora-sb state")
    with torch.no_grad():
        for name, m in layers.items():
            m.sb_R.copy_(state[f"{name}.{R_KEY}"])


def factor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen factors, sent once: fp32 copies keyed ``<module>.sb_A`` (r×n), ``<module>.sb_B`` (m×r)."""
    state = {}
    for name, m in sb_layers(model).items():
        state[f"{name}.{A_KEY}"] = m.sb_A.detach().to(torch.float32).clone()
        state[f"{name}.{B_KEY}"] = m.sb_B.detach().to(torch.float32).clone()
    return state


def install_factors(model: nn.Module, factors: Mapping[str, Factors]) -> None:
    """Install (A, B, R0) on each layer; ``factors`` must name exactly the layers of :func:`sb_layers`."""
    layers = sb_layers(model)
    missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
    if missing or extra:
        raise ValueError(f"lora-sb factors: missing layers {missing[:3]}, unexpected layers {extra[:3]}")
    for name, (a, b, r0) in factors.items():
        layers[name].install(a, b, r0)


def _check_targets(linears: Mapping[str, nn.Linear], targets: Sequence[str]) -> None:
    """Fail with one line when a target matches no linear layer of the model."""
    allowed = {name.rsplit(".", 1)[-1] for name in linears}
    unknown = [t for t in targets if t not in allowed]
    if unknown or not targets:
        raise ValueError(f"fedsb.targets: {','.join(unknown) or '(none)'} matches no linear layer "
                         f"of the model; allowed: {', '.join(sorted(allowed))}")


def _check_rank(chosen: Mapping[str, nn.Linear], rank: int) -> None:
    """A rank-r truncated SVD of an m×n matrix needs 1 ≤ r ≤ min(m, n)."""
    smallest = min(min(m.in_features, m.out_features) for m in chosen.values())
    if not 1 <= rank <= smallest:
        raise ValueError(f"fedsb.rank: {rank} is out of range; allowed: 1 to {smallest} "
                         "(the smallest side of a target layer)")
