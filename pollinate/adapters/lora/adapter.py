"""LoRA through peft: ΔW = (alpha / r) · B A on each target linear layer.

Paper: https://arxiv.org/abs/2106.09685. peft builds and runs the layers; this module adds what a
federation needs around them: the exact set of tensors that travel, loading a received state strictly,
and the dense ΔW an adapter stands for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from pollinate.adapters.base import State, register

ADAPTER_NAME = "default"
_TASK_TYPES = {"generation": TaskType.CAUSAL_LM, "classification": TaskType.SEQ_CLS}


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The shape of one client's LoRA adapter."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    task: str
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """s = alpha / r, the factor peft applies to B A."""
        return self.alpha / self.rank

    def peft_config(self) -> LoraConfig:
        """The equivalent peft ``LoraConfig``."""
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft accepts any number
            target_modules=list(self.targets),
            lora_dropout=self.dropout,
            task_type=_TASK_TYPES[self.task],
        )


@register("lora")
class LoraAdapter:
    """The LoRA adapter method (:class:`~pollinate.adapters.base.AdapterMethod`)."""

    name = "lora"

    def __init__(self, config: LoraAdapterConfig) -> None:
        self.config = config

    def attach(self, model: nn.Module) -> PeftModel:
        """Wrap ``model`` in a peft model with a fresh adapter (B = 0, so ΔW = 0)."""
        _check_targets(model, self.config.targets)
        return get_peft_model(model, self.config.peft_config())  # type: ignore[arg-type]

    def trainable_state(self, model: nn.Module) -> State:
        """Adapter factors (and, for classification, the trained head) as fp32 copies."""
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        return {k: v.detach().to(torch.float32).clone() for k, v in state.items()}

    def load_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load ``state`` into the adapter; every key must be present with its exact shape."""
        expected = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        check_state(state, {k: tuple(v.shape) for k, v in expected.items()})
        set_peft_model_state_dict(model, dict(state), adapter_name=ADAPTER_NAME)

    def delta_weights(self, model: nn.Module) -> State:
        """ΔW = s · B A of every adapted layer, keyed by the layer's module name."""
        return {
            name: module.get_delta_weight(ADAPTER_NAME).detach()  # type: ignore[attr-defined]
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
        }


def check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError unless ``state`` has exactly the keys of ``shapes``, each of that shape."""
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise ValueError(f"adapter state: missing keys {missing[:3]}, unexpected keys {extra[:3]}")
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"adapter state: {key} has shape {tuple(state[key].shape)}, "
                             f"expected {shape}")


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Fail with one line when a LoRA target matches no linear layer of ``model``."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in linear]
    if unknown or not targets:
        raise ValueError(f"lora.targets: {','.join(unknown) or '(none)'} matches no linear layer "
                         f"of the model; allowed: {', '.join(sorted(linear))}")
