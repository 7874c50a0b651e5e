"""The loops both apps run: local training steps, evaluation and greedy generation. Pure torch."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pollinate.data import IGNORE_INDEX, collate

Example = dict[str, Any]


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training did."""

    loss: float
    """Mean training loss over the steps."""
    examples: int
    tokens: int
    seconds: float
    figures: dict[str, float] = field(default_factory=dict)
    """The method's own figures of this training (SFPrompt's split bytes), sent as ``method.<name>``."""


def batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless shuffled batches: a fresh permutation from its own generator every epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        full = max(len(order) // batch_size, 1)  # drop the ragged tail; a tiny share is one batch
        for i in range(full):
            yield [examples[j] for j in order[i * batch_size : (i + 1) * batch_size]]


def _targets(batch: dict[str, torch.Tensor]) -> int:
    """Loss terms in a batch: answer tokens after the shift (generation) or examples."""
    labels = batch["labels"]
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels.dim() == 2 else labels.numel()


def micro_batches_of(step: Sequence[Example], micro: int, pad_id: int
                     ) -> list[tuple[dict[str, torch.Tensor], float]]:
    """A step's examples collated in micro-batches, each with its share of the step's loss terms.

    Weighting each micro-batch's mean loss by its share makes their sum the full batch's mean loss.
    """
    parts = [collate(list(step[i : i + micro]), pad_id) for i in range(0, len(step), micro)]
    total = max(sum(_targets(p) for p in parts), 1)
    return [(part, _targets(part) / total) for part in parts]


@torch.no_grad()
def batch_loss(model: nn.Module, parts: Sequence[tuple[dict[str, torch.Tensor], float]]) -> float:
    """The mean loss of a step's micro-batches (:func:`micro_batches_of`), forward passes only."""
    return sum(float(model(**part).loss) * share for part, share in parts)


def train_local(model: nn.Module, examples: Sequence[Example], *, steps: int, batch_size: int,
                lr: float, pad_id: int, seed: int, micro_batch: int | None = None) -> TrainResult:
    """``steps`` AdamW steps of ``batch_size`` examples on the trainable parameters of ``model``.

    With ``micro_batch`` < ``batch_size`` each step accumulates gradients over micro-batches, each
    loss weighted by its share of the step's targets, so the step equals the full-batch step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    micro = min(micro_batch or batch_size, batch_size)
    model.train()
    start, total_loss, seen, tokens = time.perf_counter(), 0.0, 0, 0
    stream = batches(examples, batch_size, seed)
    for _ in range(steps):
        step = next(stream)
        for part, share in micro_batches_of(step, micro, pad_id):
            loss = model(**part).loss * share
            loss.backward()
            total_loss += loss.item()
            tokens += int(part["attention_mask"].sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(step)
    model.eval()
    return TrainResult(total_loss / steps, seen, tokens, time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], *, batch_size: int, pad_id: int,
             classification: bool) -> dict[str, float]:
    """Mean loss per target (answer token or example); accuracy or perplexity beside it."""
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(list(examples[i : i + batch_size]), pad_id)
        out = model(**batch)
        labels = batch["labels"]
        # HF losses are means over the batch's targets; weigh each batch by its target count.
        n = labels.numel() if classification else int((labels[:, 1:] != IGNORE_INDEX).sum())
        loss_sum += out.loss.item() * n
        count += n
        if classification:
            correct += int((out.logits.argmax(-1) == labels).sum())
    loss = loss_sum / max(count, 1)
    if classification:
        return {"loss": loss, "accuracy": correct / max(count, 1)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int,
                    eos_id: int | None) -> list[int]:
    """Greedy decoding with the KV cache; returns the new token ids only."""
    model.eval()
    ids = torch.tensor([prompt_ids])
    generate: Any = model.generate  # a transformers model's generate (nn.Module does not type it)
    out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                   max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id)
    return [int(t) for t in out[0, len(prompt_ids):]]


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on gradient checkpointing of a (peft-wrapped) transformers model, for a plan that asks.

    Non-reentrant checkpointing of every layer; the embedding output requires grad so that gradients
    reach the adapters of the first layer through the recomputed layers. The KV cache is switched off
    (it is incompatible with checkpointing and useless in training).
    """
    get_base: Any = getattr(model, "get_base_model", None)
    inner: Any = get_base() if callable(get_base) else model
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(inner, "_require_grads_hooks", None):  # transformers 5 enables it already
        inner.enable_input_require_grads()
    if getattr(inner, "config", None) is not None:
        inner.config.use_cache = False
