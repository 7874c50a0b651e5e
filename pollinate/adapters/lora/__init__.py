"""LoRA adapters through peft (https://arxiv.org/abs/2106.09685)."""

from pollinate.adapters.lora.adapter import LoraAdapter, LoraAdapterConfig

__all__ = ["LoraAdapter", "LoraAdapterConfig"]
