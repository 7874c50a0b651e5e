"""Methods: one subpackage each, every one implementing the protocols of :mod:`pollinate.methods.base`.

The registry names each method's class by import path and imports it on first use, so that
``pollinate --help`` and the torch-free edge runner never import torch. A new method is one folder
plus one line here (and one strategy file, and one settings field in ``pollinate.config``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pollinate.config import RunConfig
    from pollinate.methods.base import Method

_REGISTRY: dict[str, str] = {
    "lora": "pollinate.methods.lora.method:LoraMethod",
    "lora_sb": "pollinate.methods.lora_sb.method:LoraSbMethod",
    "fedkseed": "pollinate.methods.fedkseed.method:FedKSeedMethod",
    "sfprompt": "pollinate.methods.sfprompt.method:SfPromptMethod",
}


def register(name: str, path: str) -> None:
    """Make the class at ``path`` (``"package.module:Class"``) findable as ``name``; no duplicates."""
    if not name or name in _REGISTRY:
        raise ValueError(f"method: {name!r} is registered twice or unnamed")
    if ":" not in path:
        raise ValueError(f"method {name!r}: {path!r} is not 'package.module:Class'")
    _REGISTRY[name] = path


def names() -> list[str]:
    """Every registered method's name."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (imported now); ValueError naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"method: {name!r} is not a known method; allowed: {', '.join(names())}")
    module, _, cls = _REGISTRY[name].partition(":")
    found: type[Method] = getattr(importlib.import_module(module), cls)
    return found


def build(name: str, cfg: RunConfig) -> Method:
    """Method ``name`` for the run ``cfg``, with its default variant."""
    return method_class(name)(cfg)  # type: ignore[call-arg]  # every method is built from a RunConfig


__all__ = ["build", "method_class", "names", "register"]
