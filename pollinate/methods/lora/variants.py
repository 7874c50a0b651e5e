"""How the clients of each LoRA rule treat the adapter: one object per variant, no flags.

- :class:`Shared`: every node loads the global A and B (FedIT, FedEx-LoRA);
- :class:`FrozenA`: A stays as drawn from the run's seed and never trains or travels (FFA-LoRA);
- :class:`FreshAdapter`: every round starts from B = 0, the previous rounds being merged into the base;
  only a trained head travels down (FLoRA);
- :class:`Truncated`: the global adapter has the largest rank; each client keeps its first r_k
  components (zero-padding, HetLoRA-style).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from pollinate.aggregation import LoraFactors, truncate
from pollinate.methods.lora.adapter import LoraAdapter, State


class Shared:
    """Load the global adapter as it is (FedIT, FedEx-LoRA)."""

    heterogeneous: ClassVar[bool] = False
    """Whether clients may train different ranks."""

    def prepare(self, adapter: LoraAdapter, model: nn.Module) -> None:
        """Set up a freshly attached adapter."""

    def load(self, adapter: LoraAdapter, model: nn.Module, state: Mapping[str, torch.Tensor],
             seed: int) -> None:
        """Load a downlinked global adapter state."""
        adapter.load_state(model, state)

    def initial_state(self, adapter: LoraAdapter, model: nn.Module) -> State:
        """What every client receives in round 1."""
        return adapter.trainable_state(model)


class FrozenA(Shared):
    """A is drawn once from the run's seed and never trained (https://arxiv.org/abs/2403.12313)."""

    def prepare(self, adapter: LoraAdapter, model: nn.Module) -> None:
        """Freeze every A."""
        adapter.freeze_a(model)


class FreshAdapter(Shared):
    """Each round starts from B = 0 (https://arxiv.org/abs/2409.05976); only a head travels down."""

    heterogeneous = True

    def load(self, adapter: LoraAdapter, model: nn.Module, state: Mapping[str, torch.Tensor],
             seed: int) -> None:
        """A fresh adapter drawn from ``seed``, then the received head (if the task has one)."""
        adapter.reset(model, seed)
        adapter.load_state(model, state, keys=self._head(adapter, model))

    def initial_state(self, adapter: LoraAdapter, model: nn.Module) -> State:
        """The head only: the factors restart from zero on every client."""
        return {k: v for k, v in adapter.trainable_state(model).items() if k in self._head(adapter, model)}

    @staticmethod
    def _head(adapter: LoraAdapter, model: nn.Module) -> set[str]:
        return set(LoraFactors.from_state(adapter.trainable_state(model), adapter.config.alpha).extra)


class Truncated(Shared):
    """Keep the first r_k components of the largest-rank global adapter (HetLoRA-style baseline)."""

    heterogeneous = True

    def load(self, adapter: LoraAdapter, model: nn.Module, state: Mapping[str, torch.Tensor],
             seed: int) -> None:
        """Truncate the global adapter to this client's rank, its scale re-expressed."""
        rank, alpha = adapter.config.rank, adapter.config.alpha
        own = truncate(LoraFactors.from_state(state, alpha), rank, alpha / rank)
        adapter.load_state(model, own.to_state())
