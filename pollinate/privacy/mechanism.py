"""The Gaussian mechanism on client updates, central or local, as objects both apps call.

A client's update is what it uploads minus what it received, over everything it uploads, read through
its method's :meth:`~pollinate.methods.base.Method.dp_view` (the upload as float tensors whose mean the
strategy takes: LoRA's factors and head, LoRA-SB's R, FedKSeed's K per-seed sums). Each update is
clipped to ``dp.clip`` in L2; Gaussian noise of standard deviation σ·clip is added

- ``central``: once, to the sum of the round's clipped updates, on the server (which sees the clear
  updates: the trusted-server model). The rule then runs on one upload, received + (sum + noise) / n,
  so nothing it computes depends on any client's update except through that noised mean.
- ``local``: to each client's clipped update, on the client, before it leaves the device.

Either way the rule weighs clients uniformly: a weight by examples would let one client's sensitivity
grow with the examples it claims. Noise is drawn from a generator seeded from the operating system's
secret randomness: a seed anyone can read (the run's) would let them subtract the noise.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pollinate.privacy.settings import DpSettings

if TYPE_CHECKING:
    from pollinate.methods.base import Method
    from pollinate.protocol import ClientReport

Tensors = dict[str, torch.Tensor]


def difference(view: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> Tensors:
    """``view`` minus ``received`` key by key; a key that was not received counts from zero."""
    return {k: v.to(torch.float64) - received[k].to(torch.float64) if k in received else v.to(torch.float64)
            for k, v in view.items()}


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of every tensor together."""
    return sum(float(t.to(torch.float64).pow(2).sum()) for t in tensors.values()) ** 0.5


def clip(update: Mapping[str, torch.Tensor], bound: float) -> tuple[Tensors, bool]:
    """``update`` scaled to L2 norm ``bound`` when longer (in fp64), and whether it was."""
    norm = l2_norm(update)
    if norm <= bound:
        return dict(update), False
    return {k: v.to(torch.float64) * (bound / norm) for k, v in update.items()}, True


def gaussian(like: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> Tensors:
    """Independent N(0, std²) noise shaped as ``like`` (fp64), in key order."""
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * std
            for k, v in sorted(like.items())}


def secret_generator() -> torch.Generator:
    """A generator seeded from the operating system's secret randomness."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def rebuild(received: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor],
            like: Mapping[str, torch.Tensor]) -> Tensors:
    """received + ``update``, in the dtype of ``like``'s tensors (what was uploaded)."""
    return {k: (received[k].to(torch.float64) + v if k in received else v).to(like[k].dtype)
            for k, v in update.items()}


@dataclasses.dataclass
class NoPrivacy:
    """``dp.mode = "off"``: reports and uploads as they are, weighted by examples."""

    settings: DpSettings
    clipped: int = 0
    """Updates the last :meth:`release` clipped (central mode; local clients clip unseen)."""

    def release(self, reports: Sequence[ClientReport], received: Mapping[str, torch.Tensor],
                method: Method) -> list[ClientReport]:
        """The reports unchanged."""
        return list(reports)

    def protect(self, upload: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                method: Method) -> Tensors:
        """The upload unchanged."""
        return dict(upload)


@dataclasses.dataclass
class CentralDp(NoPrivacy):
    """The server clips every update and adds N(0, σ²clip²) to their sum."""

    generator: Any = None
    """A torch.Generator for the noise (tests); None: a secret one per round."""

    def release(self, reports: Sequence[ClientReport], received: Mapping[str, torch.Tensor],
                method: Method) -> list[ClientReport]:
        """One report whose upload is received + (Σ clipped updates + noise) / n, weight 1."""
        views = [method.dp_view(r.upload) for r in reports]
        total: Tensors = {}
        self.clipped = 0
        for view in views:
            update, was_clipped = clip(difference(view, received), self.settings.clip)
            self.clipped += was_clipped
            for k, v in update.items():
                total[k] = total[k] + v if k in total else v
        std = self.settings.noise_multiplier * self.settings.clip
        if std > 0:
            noise = gaussian(total, std, self.generator or secret_generator())
            total = {k: v + noise[k] for k, v in total.items()}
        mean = {k: v / len(views) for k, v in total.items()}
        released = rebuild(received, mean, views[0])
        return [dataclasses.replace(reports[0], examples=1, upload=released)]


@dataclasses.dataclass
class LocalDp(NoPrivacy):
    """Each client clips its own update and adds N(0, σ²clip²) to it; the server weighs them equally."""

    generator: Any = None
    """A torch.Generator for the noise (tests); None: a secret one per upload."""

    def release(self, reports: Sequence[ClientReport], received: Mapping[str, torch.Tensor],
                method: Method) -> list[ClientReport]:
        """The reports (already private), each of weight 1."""
        return [dataclasses.replace(r, examples=1) for r in reports]

    def protect(self, upload: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                method: Method) -> Tensors:
        """received + clipped update + noise, in the method's view."""
        view = method.dp_view(upload)
        update, _ = clip(difference(view, received), self.settings.clip)
        std = self.settings.noise_multiplier * self.settings.clip
        if std > 0:
            noise = gaussian(update, std, self.generator or secret_generator())
            update = {k: v + noise[k] for k, v in update.items()}
        return rebuild(received, update, view)


PRIVACY: dict[str, type[NoPrivacy]] = {"off": NoPrivacy, "central": CentralDp, "local": LocalDp}


def privacy_for(settings: DpSettings) -> NoPrivacy:
    """The privacy object of ``dp.mode``."""
    return PRIVACY[settings.mode](settings)
