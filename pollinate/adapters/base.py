"""The protocol every adapter method implements, and the registry that finds a method by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

import torch
from torch import nn

State = dict[str, torch.Tensor]


class AdapterMethod(Protocol):
    """What pollinate needs from a parameter-efficient fine-tuning method.

    Only :meth:`trainable_state` crosses the wire; everything frozen is rebuilt from the base model and
    a seed on both sides.
    """

    name: str

    def attach(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` with a fresh adapter; only the adapter's parameters require grad."""
        ...

    def trainable_state(self, model: nn.Module) -> State:
        """The tensors a client sends: detached fp32 copies, keyed by parameter name."""
        ...

    def load_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load a received state; raises ValueError when keys or shapes do not match."""
        ...

    def delta_weights(self, model: nn.Module) -> State:
        """ΔW per adapted module (module name -> dense update of its weight)."""
        ...


M = TypeVar("M", bound=type)
_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make an adapter method findable by ``name`` (duplicates are an error)."""

    def add(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"adapter method {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return add


def method_class(name: str) -> type:
    """The adapter class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"method: {name!r} is not a known adapter; allowed: {', '.join(methods())}")
    return _REGISTRY[name]


def methods() -> list[str]:
    """Names of every registered adapter method."""
    return sorted(_REGISTRY)
