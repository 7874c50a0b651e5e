"""Adapter methods: one subpackage each, all implementing :class:`AdapterMethod`."""

from pollinate.adapters.base import AdapterMethod, State, method_class, methods, register
from pollinate.adapters.lora import LoraAdapter, LoraAdapterConfig

__all__ = [
    "AdapterMethod",
    "LoraAdapter",
    "LoraAdapterConfig",
    "State",
    "method_class",
    "methods",
    "register",
]
