"""SFPrompt's split model and pruning (https://arxiv.org/abs/2407.17533): pure torch, no Flower, no network.

One Hugging Face model is cut into three parts that share its modules (nothing is copied)::

    client: h = head(x) = blocks[:a]([p; E(x)])      [B, S, d]    p: the soft prompt, P trained vectors
    server: z = body(h) = blocks[a:n-b](h)           [B, S, d]    frozen, never updated
    client: loss, logits = tail(z) = out(blocks[n-b:](z))

B examples, T tokens, S = P + T positions, d hidden, V vocabulary, C classes. The client trains the prompt
and the tail; the head's blocks and embeddings stay frozen (the prompt's gradient flows through them).

What each side needs besides the tensor it receives: the client holds the batch (``input_ids``,
``attention_mask``, ``labels``), none of which leaves it. Positions are 0..S-1 on every side (the prompt
first, the tokens right-padded as :func:`pollinate.data.collate` pads them), rebuilt from h's shape.
Llama attends causally, so with right padding no real position ever attends to a padding one: its body
needs no mask and h alone crosses the network. BERT attends both ways: its body needs the [B, S] padding
mask (:meth:`Split.body_mask`), B·S bytes beside h's 4·B·S·d.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from pollinate.catalog import CLASSIFICATION, GENERATION, TASKS
from pollinate.data.tokenize import IGNORE_INDEX
from pollinate.methods.base import check_state
from pollinate.methods.settings import fail
from pollinate.methods.sfprompt.settings import check_cut, check_keep, check_prompt_tokens

__all__ = [
    "PROMPT_KEY",
    "TAIL_PREFIX",
    "Body",
    "BodyCompute",
    "Parts",
    "Split",
    "el2n_scores",
    "keep_hardest",
    "kept_count",
    "parts_of",
    "split_step",
]

PROMPT_KEY = "sfprompt.prompt"
"""The prompt's key in an uploaded state: [P, d]."""
TAIL_PREFIX = "sfprompt.tail."
"""Prefix of the tail's keys in an uploaded state, before the model's own parameter name."""

Batch = Mapping[str, Tensor]
"""A collated batch: ``input_ids`` and ``attention_mask`` [B, T], ``labels`` [B, T] or [B]."""


# --------------------------------------------------------------------------------------------------
# Model families: how each embeds, runs a span of its blocks and finishes
# --------------------------------------------------------------------------------------------------


class Parts(Protocol):
    """One model family's pieces; a family is a class, chosen by ``config.model_type``."""

    task: str
    """What the model's output head does: ``generation`` or ``classification``."""
    blocks: list[nn.Module]
    """The transformer blocks, in order."""
    max_positions: int | None
    """Positions a learned position table holds (S must fit); None for rotary positions."""

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token vectors [B, T, d]: the space the prompt lives in."""
        ...

    def enter(self, x: Tensor) -> Tensor:
        """What the model does to [p; E(x)] [B, S, d] before its first block."""
        ...

    def run(self, blocks: Sequence[nn.Module], x: Tensor, mask: Tensor | None) -> Tensor:
        """``blocks`` over x [B, S, d] with the [B, S] padding mask (None: no padding)."""
        ...

    def finish(self, z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The final norm or pooler and the output head: the loss and the logits."""
        ...

    def entry_modules(self) -> list[nn.Module]:
        """The modules before the first block (head side)."""
        ...

    def exit_modules(self) -> list[nn.Module]:
        """The modules after the last block (tail side)."""
        ...

    def body_mask(self, mask: Tensor) -> Tensor | None:
        """What the body needs of the [B, S] padding mask (None: nothing)."""
        ...


class LlamaParts:
    """Llama-family causal LMs (``LlamaForCausalLM``): rotary positions, causal attention."""

    task = GENERATION
    max_positions: int | None = None  # rotary: no table to run past

    def __init__(self, model: Any) -> None:
        self.model, self.inner, self.config = model, model.model, model.config
        self.blocks = list(self.inner.layers)

    def embed(self, input_ids: Tensor) -> Tensor:
        out: Tensor = self.inner.embed_tokens(input_ids)  # [B, T, d]
        return out

    def enter(self, x: Tensor) -> Tensor:
        return x  # positions enter in every block (rotary)

    def run(self, blocks: Sequence[nn.Module], x: Tensor, mask: Tensor | None) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # [1, S]
        causal = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=mask,
                                    past_key_values=None, position_ids=positions)
        rotary = self.inner.rotary_emb(x, position_ids=positions)  # (cos, sin), each [1, S, head_dim]
        for block in blocks:
            x = block(x, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
        return x

    def finish(self, z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits: Tensor = self.model.lm_head(self.inner.norm(z))  # [B, S, V]
        # The model's own loss: shift by one, mean over the labels that are not IGNORE_INDEX.
        loss: Tensor = self.model.loss_function(logits=logits, labels=labels,
                                                vocab_size=self.config.vocab_size)
        return loss, logits

    def entry_modules(self) -> list[nn.Module]:
        return [self.inner.embed_tokens]

    def exit_modules(self) -> list[nn.Module]:
        return [self.inner.norm, self.model.lm_head]  # a tied lm_head weight is the embedding's: frozen

    def body_mask(self, mask: Tensor) -> Tensor | None:
        return None  # causal and right-padded: real positions never see padding ones


class BertParts:
    """BERT-family sequence classifiers (``BertForSequenceClassification``): learned positions, both ways.

    The prompt goes before ``[CLS]``, so the pooler reads the first prompt vector (as peft's prompt tuning
    of BERT does): the prompt's first vector becomes a trained ``[CLS]``.
    """

    task = CLASSIFICATION

    def __init__(self, model: Any) -> None:
        self.model, self.inner, self.config = model, model.bert, model.config
        self.blocks = list(self.inner.encoder.layer)
        self.max_positions: int | None = int(self.config.max_position_embeddings)
        if int(self.config.num_labels) < 2 or self.inner.pooler is None:
            raise ValueError(f"num_labels: {self.config.num_labels!r} is not allowed; sfprompt trains "
                             "single-label classifiers with a pooler and 2 or more classes")

    def embed(self, input_ids: Tensor) -> Tensor:
        out: Tensor = self.inner.embeddings.word_embeddings(input_ids)  # [B, T, d]
        return out

    def enter(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner.embeddings(inputs_embeds=x)  # + positions 0..S-1, token type 0, LayerNorm
        return out

    def run(self, blocks: Sequence[nn.Module], x: Tensor, mask: Tensor | None) -> Tensor:
        bias = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=mask)
        for block in blocks:
            x = block(x, bias)
        return x

    def finish(self, z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.inner.pooler(z)  # [B, d], from position 0
        logits: Tensor = self.model.classifier(self.model.dropout(pooled))  # [B, C]
        return F.cross_entropy(logits, labels), logits

    def entry_modules(self) -> list[nn.Module]:
        return [self.inner.embeddings]

    def exit_modules(self) -> list[nn.Module]:
        return [self.inner.pooler, self.model.classifier]

    def body_mask(self, mask: Tensor) -> Tensor | None:
        return mask.bool()  # attention both ways: real positions would see padding ones


FAMILIES: dict[str, tuple[type[LlamaParts] | type[BertParts], str]] = {
    "llama": (LlamaParts, "lm_head"),
    "bert": (BertParts, "classifier"),
}
"""``config.model_type`` → its parts and the output head its model must have."""


def parts_of(model: nn.Module) -> Parts:
    """The parts of ``model``; ValueError for a family or output head sfprompt does not cut."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    family = FAMILIES.get(model_type)
    if family is None or not hasattr(model, family[1]):
        raise fail("model", f"{model_type} {type(model).__name__}",
                   "sfprompt cuts llama causal LMs and bert sequence classifiers")
    return family[0](model)


# --------------------------------------------------------------------------------------------------
# The client's side: prompt, head and tail
# --------------------------------------------------------------------------------------------------


def _vocab_prompt(embedding: Tensor, tokens: int, seed: int, pad_id: int | None) -> Tensor:
    """[tokens, d] copies of embedding rows of token ids drawn uniformly from ``seed``, padding excluded.

    Real vocabulary vectors start the prompt inside the distribution the first block expects
    (Lester et al. 2021 found this beats a random start).
    """
    vocab = embedding.shape[0]
    skip = pad_id if pad_id is not None and 0 <= pad_id < vocab else None
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab - (skip is not None), (tokens,), generator=gen)  # [P]
    if skip is not None:
        ids = ids + (ids >= skip).long()  # step over the padding row (often zero)
    return embedding.detach()[ids.to(embedding.device)].clone()  # [P, d]


def _tail_parameters(model: nn.Module, head: Sequence[nn.Module], tail: Sequence[nn.Module]
                     ) -> dict[str, nn.Parameter]:
    """The tail's parameters by model name, without any the head holds (a tied output embedding)."""
    on_head = {id(p) for m in head for p in m.parameters()}
    on_tail = {id(p) for m in tail for p in m.parameters()}
    return {name: p for name, p in model.named_parameters()
            if id(p) in on_tail and id(p) not in on_head}


class Split:
    """The client's view of a model cut at ``head_layers`` and ``tail_layers``: prompt, head and tail.

    Shares the model's modules and freezes every model parameter but the tail's (the tied embedding of
    SmolLM2-like models stays frozen). The body's blocks are not used here: :class:`BodyCompute` runs them.
    Dropout follows the model's mode; parity with the unsplit model holds in ``eval()``.

    Parameters
    ----------
    model : PreTrainedModel
        A Llama causal LM or a BERT sequence classifier (see :func:`parts_of`), changed in place only in
        its ``requires_grad`` flags.
    head_layers, tail_layers : int
        Blocks of the head and the tail; at least one each, and at least one left for the body.
    prompt_tokens : int
        P, the soft prompt's vectors.
    seed : int
        Draws the vocabulary tokens whose embeddings start the prompt.
    """

    def __init__(self, model: nn.Module, *, head_layers: int, tail_layers: int, prompt_tokens: int,
                 seed: int) -> None:
        self.parts = parts_of(model)
        n = len(self.parts.blocks)
        check_cut(head_layers, tail_layers, n)
        check_prompt_tokens(prompt_tokens)
        self.task = self.parts.task
        self.head_blocks = self.parts.blocks[:head_layers]
        self.tail_blocks = self.parts.blocks[n - tail_layers:]
        hf_model: Any = model  # a transformers model (nn.Module does not type its API)
        embedding = hf_model.get_input_embeddings()
        pad_id = hf_model.config.pad_token_id
        self.prompt = nn.Parameter(_vocab_prompt(embedding.weight, prompt_tokens, seed, pad_id))
        self.tail_params = _tail_parameters(model, [*self.parts.entry_modules(), *self.head_blocks],
                                            [*self.tail_blocks, *self.parts.exit_modules()])
        model.requires_grad_(False)
        for p in self.tail_params.values():
            p.requires_grad_(True)

    @property
    def prompt_tokens(self) -> int:
        """P."""
        return int(self.prompt.shape[0])

    def trainable(self) -> list[nn.Parameter]:
        """What the client's optimiser steps: the prompt, then the tail's parameters in model order."""
        return [self.prompt, *self.tail_params.values()]

    def mask(self, batch: Batch) -> Tensor:
        """The padding mask of [p; x]: [B, S], the prompt's P positions attended to."""
        mask = batch["attention_mask"]  # [B, T]
        ones = torch.ones(mask.shape[0], self.prompt_tokens, dtype=mask.dtype, device=mask.device)
        return torch.cat([ones, mask], dim=1)  # [B, S]

    def body_mask(self, batch: Batch) -> Tensor | None:
        """What travels to the body beside h: None (Llama) or the [B, S] bool padding mask (BERT)."""
        return self.parts.body_mask(self.mask(batch))

    def labels(self, batch: Batch) -> Tensor:
        """Labels aligned with the tail's logits: [B, S] with the prompt's P ignored, or [B] as they are."""
        labels = batch["labels"]
        if labels.dim() == 1:
            return labels  # one class per example
        ignored = torch.full((labels.shape[0], self.prompt_tokens), IGNORE_INDEX, dtype=labels.dtype,
                             device=labels.device)  # [B, P]
        return torch.cat([ignored, labels], dim=1)  # [B, S]

    def head(self, batch: Batch) -> Tensor:
        """h = the head's blocks over [p; E(x)]: [B, S, d], with a graph back to the prompt."""
        ids = batch["input_ids"]  # [B, T]
        self._check_positions(ids.shape[1])
        prompt = self.prompt.unsqueeze(0).expand(ids.shape[0], -1, -1)  # [B, P, d]
        x = self.parts.enter(torch.cat([prompt, self.parts.embed(ids)], dim=1))  # [B, S, d]
        return self.parts.run(self.head_blocks, x, self.mask(batch))

    def tail(self, z: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """The loss (the model's mean) and logits ([B, S, V] or [B, C]) of the tail's blocks over z."""
        out = self.parts.run(self.tail_blocks, z, self.mask(batch))  # [B, S, d]
        return self.parts.finish(out, self.labels(batch))

    def local_loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """tail(head(x)) with the body skipped (SFPrompt's local-loss phase): nothing leaves the client."""
        return self.tail(self.head(batch), batch)

    @torch.no_grad()
    def local_scores(self, batch: Batch) -> Tensor:
        """EL2N scores [B] of the local-loss outputs (:func:`el2n_scores`), what pruning ranks."""
        _, logits = self.local_loss(batch)
        return el2n_scores(logits, self.labels(batch), self.task)

    def state(self) -> dict[str, Tensor]:
        """What the client uploads: the prompt and the tail's trainable tensors, detached fp32 copies."""
        state = {PROMPT_KEY: self.prompt.detach().float().clone()}
        state.update({TAIL_PREFIX + name: p.detach().float().clone() for name, p in self.tail_params.items()})
        return state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The key and shape of every tensor of :meth:`state`."""
        shapes = {PROMPT_KEY: tuple(self.prompt.shape)}
        shapes.update({TAIL_PREFIX + name: tuple(p.shape) for name, p in self.tail_params.items()})
        return shapes

    @torch.no_grad()
    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Copy a :meth:`state`-shaped dict into the prompt and the tail; ValueError on any other keys."""
        check_state(state, self.shapes(), "sfprompt state")
        self.prompt.copy_(state[PROMPT_KEY])
        for name, p in self.tail_params.items():
            p.copy_(state[TAIL_PREFIX + name])

    def _check_positions(self, tokens: int) -> None:
        """A learned position table must hold P + T positions."""
        most = self.parts.max_positions
        if most is not None and self.prompt_tokens + tokens > most:
            raise fail("sfprompt.prompt-tokens", self.prompt_tokens,
                       f"with {tokens}-token inputs it must be at most {most - tokens} "
                       f"(the model has {most} positions)")


# --------------------------------------------------------------------------------------------------
# The server's side: the frozen body, plain tensors in and out
# --------------------------------------------------------------------------------------------------


class Body(Protocol):
    """What the client calls for the body: :class:`BodyCompute` here, a gRPC stub over the network."""

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        """z = body(h)."""
        ...

    def backward(self, h: Tensor, grad_z: Tensor, mask: Tensor | None) -> Tensor:
        """∂L/∂h = J_body(h)ᵀ ∂L/∂z."""
        ...


class BodyCompute:
    """The body's blocks of ``model`` (frozen, dropout off); takes and returns plain tensors.

    Stateless: :meth:`backward` recomputes the body's forward from the h it is given (one more body
    forward per batch, and no graph held between calls). The blocks stay in eval mode, so that forward
    is the same as the first.

    Parameters
    ----------
    model : PreTrainedModel
        The same base model the clients cut (see :func:`parts_of`).
    head_layers, tail_layers : int
        The clients' cut points; the body is every block between them.
    """

    def __init__(self, model: nn.Module, *, head_layers: int, tail_layers: int) -> None:
        self.parts = parts_of(model)
        n = len(self.parts.blocks)
        check_cut(head_layers, tail_layers, n)
        self.blocks = self.parts.blocks[head_layers : n - tail_layers]
        config: Any = model.config
        self.hidden_size = int(config.hidden_size)
        for block in self.blocks:
            block.requires_grad_(False)
            block.eval()

    @torch.no_grad()
    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """z = body(h): [B, S, d] → [B, S, d]; ``mask`` [B, S] (None: no padding)."""
        self._check(h, mask)
        return self.parts.run(self.blocks, h, mask)

    def backward(self, h: Tensor, grad_z: Tensor, mask: Tensor | None = None) -> Tensor:
        """∂L/∂h = J_body(h)ᵀ ∂L/∂z [B, S, d], for the h of a :meth:`forward` and its z's gradient."""
        self._check(h, mask)
        if grad_z.shape != h.shape:
            raise fail("grad_z", tuple(grad_z.shape), f"it must have h's shape {tuple(h.shape)}")
        with torch.enable_grad():
            leaf = h.detach().requires_grad_(True)
            z = self.parts.run(self.blocks, leaf, mask)
            (grad_h,) = torch.autograd.grad(z, leaf, grad_z)  # the body's weights get no .grad
        return grad_h

    def _check(self, h: Tensor, mask: Tensor | None) -> None:
        """A request's tensors must be [B, S, d] activations and a [B, S] mask."""
        if h.dim() != 3 or h.shape[2] != self.hidden_size or not h.is_floating_point():
            raise fail("h", f"{h.dtype} {tuple(h.shape)}",
                       f"it must be floating point [batch, positions, {self.hidden_size}]")
        if mask is not None and mask.shape != h.shape[:2]:
            raise fail("mask", tuple(mask.shape), f"it must be [batch, positions] = {tuple(h.shape[:2])}")


def split_step(split: Split, body: Body, batch: Batch, *, weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """One split forward and backward of ``batch``, exactly as over the network; gradients accumulate.

    The client computes h with a graph and sends ``h.detach()``; the body returns z; the tail's loss on z
    as a leaf gives the tail's gradients and ∂L/∂z; the body returns ∂L/∂h; ``h.backward(∂L/∂h)`` gives the
    prompt's. ``weight`` scales the loss before backward (a micro-batch's share of a step).

    Returns
    -------
    loss, logits : Tensor
        The unweighted loss and the logits, detached.
    """
    h = split.head(batch)  # [B, S, d]
    mask = split.body_mask(batch)
    sent = h.detach()
    z = body.forward(sent, mask).detach().requires_grad_(True)  # a leaf: the tail's graph ends here
    loss, logits = split.tail(z, batch)
    torch.autograd.backward(loss * weight)  # the tail's gradients, and ∂L/∂z into z.grad
    assert z.grad is not None
    torch.autograd.backward(h, body.backward(sent, z.grad, mask))  # the prompt's gradient
    return loss.detach(), logits.detach()


# --------------------------------------------------------------------------------------------------
# Pruning by EL2N
# --------------------------------------------------------------------------------------------------


def _error_norms(logits: Tensor, labels: Tensor) -> Tensor:
    """‖softmax(logits) − onehot(labels)‖₂ over the last axis: [..., K], [...] → [...]."""
    error = logits.float().softmax(-1)  # a fresh tensor: the one-hot is subtracted in place
    error.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(error[..., :1], -1.0))
    norms: Tensor = torch.linalg.vector_norm(error, dim=-1)
    return norms


@torch.no_grad()
def el2n_scores(logits: Tensor, labels: Tensor, task: str) -> Tensor:
    """EL2N = ‖softmax(output) − onehot(y)‖₂ per example (Paul et al. 2021): high means hard.

    Parameters
    ----------
    logits : Tensor
        [B, C] (classification) or [B, S, V] (generation).
    labels : Tensor
        [B], or [B, S] aligned with the logits, ``IGNORE_INDEX`` where nothing is predicted.
    task : str
        ``classification``: the norm of each example. ``generation``: after the model's causal shift
        (position t predicts label t+1), the mean norm over the answer tokens (labels not
        ``IGNORE_INDEX``); 0 for an example without any (nothing to learn from it).

    Returns
    -------
    Tensor
        [B] fp32 scores.
    """
    if task == CLASSIFICATION:
        return _error_norms(logits, labels)
    if task != GENERATION:
        raise fail("task", task, f"allowed: {', '.join(TASKS)}")
    logits, labels = logits[:, :-1], labels[:, 1:]  # [B, S-1, V], [B, S-1]
    answer = labels != IGNORE_INDEX  # [B, S-1]
    norms = _error_norms(logits, labels.clamp(min=0)) * answer  # ignored positions count 0
    return norms.sum(1) / answer.sum(1).clamp(min=1)


def kept_count(n: int, keep: float) -> int:
    """⌊keep·n⌋ examples, at least 1 of a non-empty set (a client always trains on something).

    ``keep`` counts as the decimal it prints as (0.29·100 = 29, not the 28.999… of binary floats).
    """
    check_keep(keep)
    if n == 0:
        return 0
    return max(1, int(Fraction(repr(keep)) * n))


def keep_hardest(scores: Tensor, keep: float) -> Tensor:
    """Indices of the :func:`kept_count` highest ``scores`` [n], ascending; ties go to the lower index.

    Raises
    ------
    ValueError
        If ``keep`` is outside (0, 1] (``sfprompt.keep``), or ``scores`` is not 1-D and finite.
    """
    count = kept_count(scores.numel(), keep)
    if scores.dim() != 1 or not bool(torch.isfinite(scores).all()):
        raise fail("scores", tuple(scores.shape), "they must be one finite score per example")
    order = torch.sort(scores, descending=True, stable=True).indices  # stable: equal scores keep order
    return order[:count].sort().values
