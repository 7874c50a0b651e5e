"""What every method's memory planning shares: the model's dimensions, a plan, an estimate.

A :class:`Plan` says how one client trains: the micro-batch and the gradient-accumulation steps that keep
the requested effective batch, the sequence-length cap and whether activations are recomputed (gradient
checkpointing). A method adds its own fields in a subclass (LoRA's rank). :class:`ModelDims` is a
model's shape read from its configuration alone (no weights), and a method's ``estimate`` turns a
(dims, plan) pair into an :class:`Estimate` of the peak resident memory. Pure torch and transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from pollinate.client.budget import format_size  # pure Python: sizes in human units

__all__ = ["FP32", "MIN_SEQ_LEN", "Estimate", "ModelDims", "Plan", "TargetShape", "model_dims",
           "micro_batches", "seq_len_steps"]

FP32 = 4
"""Bytes per element: the base, the adapters and every activation are fp32 on CPU."""

MIN_SEQ_LEN = 16
"""The shortest sequence cap the planner offers: shorter examples say too little to train on."""




@dataclass(frozen=True)
class TargetShape:
    """The adapted linear layers of one name (``q_proj``): ``count`` layers of ``in × out``."""

    name: str
    in_features: int
    out_features: int
    count: int


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a transformer that decide its training memory, read from its config."""

    name: str
    """The model's name, for messages."""
    model_type: str
    """``llama``, ``bert``, ...: picks the per-layer activation model."""
    encoder: bool
    """True for BERT-like encoders (post-norm, GELU MLP, dropout), False for decoders."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    backbone_params: int
    """Parameters of the model without a task head (tied embeddings counted once)."""
    tied_embeddings: bool
    """Whether the LM head reuses the input embeddings (no extra V × hidden weights)."""
    num_labels: int
    hidden_dropout: float
    attention_dropout: float
    targets: tuple[TargetShape, ...]
    """The linear layers the method adapts."""

    def head_params(self, task: str) -> int:
        """Parameters of the task head on top of the backbone."""
        if task == "classification":
            return self.num_labels * self.hidden + self.num_labels  # weight and bias
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def params(self, task: str) -> int:
        """All parameters of the model for ``task`` (tied weights once)."""
        return self.backbone_params + self.head_params(task)

    def lora_params(self, rank: int) -> int:
        """Σ r (m + n) over the adapted layers: the parameters of A (r × n) and B (m × r)."""
        return sum(t.count * rank * (t.in_features + t.out_features) for t in self.targets)


def _first(config: PretrainedConfig, *names: str, default: Any = None) -> Any:
    """The first attribute of ``config`` among ``names`` that is set."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_dims(config: PretrainedConfig, targets: Sequence[str], *, name: str = "",
               key: str = "lora.targets") -> ModelDims:
    """Read the planner's view of a model from its transformers config; no weights are loaded.

    Parameters
    ----------
    config : PretrainedConfig
        The model's configuration (e.g. ``pollinate.models.model_config(name, task)``).
    targets : Sequence[str]
        Names of the linear layers the method adapts (``q_proj``, ``query``, ...), as in ``lora.targets``.
    name : str, optional
        The model's name for messages; defaults to the config's ``_name_or_path`` or model type.
    key : str, default ``"lora.targets"``
        The configuration key of ``targets``, named in the error.

    Returns
    -------
    ModelDims

    Raises
    ------
    ValueError
        If a target matches no linear layer of the model.
    """
    with torch.device("meta"):  # shapes only: builds in well under a second, allocates nothing
        backbone: nn.Module = AutoModel.from_config(config)
    linears = [(n.rsplit(".", 1)[-1], m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    shapes = _target_shapes(linears, targets, key)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    model_type = str(getattr(config, "model_type", ""))
    return ModelDims(
        name=name or str(getattr(config, "_name_or_path", "") or model_type),
        model_type=model_type,
        encoder=not bool(getattr(config, "is_decoder", False)) and model_type in _ENCODER_TYPES,
        layers=int(_first(config, "num_hidden_layers", "n_layer")),
        hidden=hidden,
        intermediate=int(_first(config, "intermediate_size", "n_inner", default=4 * hidden)),
        heads=heads,
        kv_heads=int(_first(config, "num_key_value_heads", default=heads)),
        head_dim=int(_first(config, "head_dim", default=hidden // heads)),
        vocab=int(config.vocab_size),
        max_positions=int(_first(config, "max_position_embeddings", default=2**31 - 1)),
        backbone_params=sum(p.numel() for p in backbone.parameters()),  # skips tied duplicates
        tied_embeddings=bool(_first(config, "tie_word_embeddings", default=True)),
        num_labels=int(getattr(config, "num_labels", 2)),
        hidden_dropout=float(_first(config, "hidden_dropout_prob", "hidden_dropout", default=0.0)),
        attention_dropout=float(
            _first(config, "attention_probs_dropout_prob", "attention_dropout", default=0.0)),
        targets=shapes,
    )


_ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet"})


def _target_shapes(linears: list[tuple[str, nn.Linear]], targets: Sequence[str],
                   key: str) -> tuple[TargetShape, ...]:
    """Group the linear layers named in ``targets`` by name and shape."""
    counts: dict[tuple[str, int, int], int] = {}
    for short, module in linears:
        if short in targets:
            shape = (short, module.in_features, module.out_features)
            counts[shape] = counts.get(shape, 0) + 1
    unknown = [t for t in targets if not any(k[0] == t for k in counts)]
    if unknown or not targets:
        allowed = ", ".join(sorted({short for short, _ in linears}))
        raise ValueError(f"{key}: {','.join(unknown) or '(none)'} matches no linear layer "
                         f"of the model; allowed: {allowed}")
    return tuple(TargetShape(n, i, o, c) for (n, i, o), c in sorted(counts.items()))


# --------------------------------------------------------------------------------------------------
# Plans and estimates
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one client trains, whatever the method. The effective batch is ``micro_batch * grad_accum``.

    A method with choices of its own (LoRA's rank) subclasses it and adds fields; every field travels
    as ``plan.<field>`` in a client's reply.
    """

    method: str
    """The method's registered name (``"lora"``, ``"lora_sb"``)."""
    micro_batch: int
    """Examples per forward/backward pass."""
    grad_accum: int
    """Passes whose gradients are summed before one optimiser step."""
    seq_len: int
    """Cap on tokens per example; longer examples are truncated."""
    checkpointing: bool
    """Recompute each layer's activations in the backward pass instead of keeping them."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("method", "checkpointing"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"plan.{f.name}: {value!r} is not allowed; expected an integer >= 1")

    @property
    def effective_batch(self) -> int:
        """Examples per optimiser step."""
        return self.micro_batch * self.grad_accum

    def fields(self) -> dict[str, int | bool]:
        """Every field but the method, by name: what a reply carries as ``plan.*``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method"}

    def choices(self) -> str:
        """The method's own choices, for :meth:`describe` (``"rank 8"``); none in a plain plan."""
        return ""

    def describe(self) -> str:
        """One line: ``"lora rank 8, batch 2 x 4, 128 tokens, checkpointing"``."""
        ckpt = ", checkpointing" if self.checkpointing else ""
        own = f" {self.choices()}" if self.choices() else ""
        batch = f"batch {self.micro_batch} x {self.grad_accum}"
        return f"{self.method}{own}, {batch}, {self.seq_len} tokens{ckpt}"


LIBRARY = "library pages"
"""The part of an estimate for library code and data that a training step maps in from files (RssFile
growth). It is part of the measured peak, but how much of it is mapped is not the plan's: 16-26 MB per
tiny-model step with the calibration machines' long-installed environment, 30-55 MB with a freshly
installed one on the same machine (as on CI); the kernel can reclaim it. Checks that compare hosts and
installs leave it out."""


@dataclass(frozen=True)
class Estimate:
    """Estimated peak resident memory of a training step, in bytes, and what it is made of."""

    total: int
    parts: dict[str, int] = field(default_factory=dict)
    """What the peak is made of, e.g. for LoRA ``"base weights"``, ``"adapter"`` (weights and
    gradients), ``"optimizer"``, ``"activations"`` (kept for backward), ``"workspace"`` (backward
    temporaries), ``"logits"``, ``"runtime"`` and :data:`LIBRARY`; they sum to ``total``."""

    @classmethod
    def of(cls, parts: dict[str, float]) -> Estimate:
        """An estimate whose total is the sum of ``parts`` (zero parts dropped)."""
        kept = {k: int(v) for k, v in parts.items() if int(v) > 0}
        return cls(sum(kept.values()), kept)

    def breakdown(self, limit: int = 4) -> str:
        """The ``limit`` largest parts: ``"base weights 538 MB, logits 400 MB, ..."``."""
        ranked = sorted(self.parts.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{k} {format_size(v)}" for k, v in ranked[:limit])
        return text + (", ..." if len(ranked) > limit else "")




# --------------------------------------------------------------------------------------------------
# The ladders every method's candidates climb down
# --------------------------------------------------------------------------------------------------


def seq_len_steps(seq_len: int, max_positions: int | None = None) -> list[int]:
    """Sequence caps to try, longest first: ``seq_len``, then 2^k and 1.5·2^k below it, down to 16.

    ``seq_len`` itself (capped at ``max_positions``) always comes first, even when it is below 16.
    """
    top = min(seq_len, max_positions) if max_positions else seq_len
    steps = {top}
    k = 3
    while 2**k < top:
        for value in (2**k, 3 * 2 ** (k - 1)):
            if MIN_SEQ_LEN <= value < top:
                steps.add(value)
        k += 1
    return sorted(steps, reverse=True)




def micro_batches(batch_size: int) -> list[int]:
    """Micro-batch sizes that divide ``batch_size``, largest first (the effective batch never changes)."""
    return [b for b in range(batch_size, 0, -1) if batch_size % b == 0]
