"""LoRA through peft: ΔW = (alpha / r) · B A on each target linear layer.

Paper: https://arxiv.org/abs/2106.09685. peft builds and runs the layers; this module adds what a
federation needs around them: the exact set of tensors that travel, loading a received state strictly,
and the dense ΔW an adapter stands for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from pollinate.methods.base import check_state

State = dict[str, torch.Tensor]

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


class LoraAdapter:
    """peft's LoRA on a model, with what a federation needs around it."""

    def __init__(self, config: LoraAdapterConfig) -> None:
        self.config = config

    def attach(self, model: nn.Module) -> PeftModel:
        """Wrap ``model`` in a peft model with a fresh adapter (B = 0, so ΔW = 0)."""
        _check_targets(model, self.config.targets)
        return get_peft_model(model, self.config.peft_config())  # type: ignore[arg-type]

    def trainable_state(self, model: nn.Module) -> State:
        """The adapter tensors that train (so not a frozen A), fp32 copies, in peft's key names."""
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        trainable = _trainable_keys(model)
        return {k: v.detach().to(torch.float32).clone() for k, v in state.items() if k in trainable}

    def load_state(self, model: nn.Module, state: Mapping[str, torch.Tensor],
                   keys: Iterable[str] | None = None) -> None:
        """Load ``state``; it must hold exactly ``keys`` (default: the trainable ones), each in shape."""
        shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        wanted = set(keys) if keys is not None else _trainable_keys(model)
        check_state(state, {k: shapes[k] for k in wanted if k in shapes}, "adapter state")
        set_peft_model_state_dict(model, dict(state), adapter_name=ADAPTER_NAME)

    def freeze_a(self, model: nn.Module) -> None:
        """Stop training every A (FFA-LoRA): A stays as drawn from the run's seed."""
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)

    def reset(self, model: nn.Module, seed: int) -> None:
        """A fresh adapter: B = 0 (so ΔW = 0) and A drawn anew from ``seed``."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # peft draws A from the global RNG
            for module in _lora_layers(model).values():
                module.reset_lora_parameters(ADAPTER_NAME, init_lora_weights=True)

    def delta_weights(self, model: nn.Module) -> State:
        """ΔW = s · B A of every adapted layer, keyed by the layer's module name."""
        return {name: m.get_delta_weight(ADAPTER_NAME).detach()  # type: ignore[attr-defined]
                for name, m in _lora_layers(model).items()}

    def base_weights(self, model: nn.Module) -> State:
        """The frozen weight W (m×n) under every adapted layer, by module name: merges write here."""
        return {name: m.get_base_layer().weight.data  # type: ignore[union-attr,misc]
                for name, m in _lora_layers(model).items()}


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A}


def _trainable_keys(model: nn.Module) -> set[str]:
    """peft state-dict names of the parameters that require grad (peft drops the adapter name)."""
    suffixes = (f".modules_to_save.{ADAPTER_NAME}.", f".{ADAPTER_NAME}.")  # a trained head, a factor
    keys = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            for suffix in suffixes:
                name = name.replace(suffix, ".")
            keys.add(name)
    return keys


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Fail with one line when a LoRA target matches no linear layer of ``model``."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in linear]
    if unknown or not targets:
        raise ValueError(f"lora.targets: {','.join(unknown) or '(none)'} matches no linear layer "
                         f"of the model; allowed: {', '.join(sorted(linear))}")
