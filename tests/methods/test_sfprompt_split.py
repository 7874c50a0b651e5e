"""SFPrompt's split model and pruning (../shared/docs/algorithms.md, "SFPrompt"), on tiny Llama and BERT.

The tiny models have two blocks, too few for a head, a body and a tail, so these tests build them from the
same configurations with four (head 1, body 2, tail 1). fp32, eval mode (dropout off).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaForSequenceClassification,
)

from pollinate import models
from pollinate.data import IGNORE_INDEX, collate
from pollinate.methods.sfprompt.settings import SfPromptSettings, check_cut
from pollinate.methods.sfprompt.split import (
    PROMPT_KEY,
    TAIL_PREFIX,
    BodyCompute,
    Split,
    el2n_scores,
    keep_hardest,
    kept_count,
    split_step,
)

LAYERS, HEAD, TAIL, PROMPT = 4, 1, 1, 3
FAMILIES = [("tiny-llama", "generation"), ("tiny-bert", "classification")]
TOL = 1e-5


def build(name: str, task: str, layers: int = LAYERS) -> Any:
    """A tiny model with ``layers`` blocks, seeded, in eval mode."""
    config = models.model_config(name, task, num_labels=3)
    config.num_hidden_layers = layers
    auto = AutoModelForCausalLM if task == "generation" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto.from_config(config, dtype=torch.float32)
    return model.eval()


def make_batch(task: str, seed: int = 1) -> dict[str, Tensor]:
    """Three right-padded examples of 7, 4 and 9 tokens; generation labels ignore a prompt-like head,
    except in the second example, whose first label counts (the prompt's last position predicts it)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate((7, 4, 9)):
        ids = torch.randint(0, 256, (n,), generator=gen).tolist()
        cut = 0 if i == 1 else n // 2
        labels = [IGNORE_INDEX] * cut + ids[cut:] if task == "generation" else i % 3
        examples.append({"input_ids": ids, "attention_mask": [1] * n, "labels": labels})
    return collate(examples, pad_id=258)


def cut(model: Any) -> tuple[Split, BodyCompute]:
    split = Split(model, head_layers=HEAD, tail_layers=TAIL, prompt_tokens=PROMPT, seed=7)
    return split, BodyCompute(model, head_layers=HEAD, tail_layers=TAIL)


class Wire:
    """The body behind a pretend network: every tensor crosses as bytes, and the bytes are counted.

    As the body service does, the server side keeps the h of a forward until its backward.
    """

    def __init__(self, body: BodyCompute) -> None:
        self.body, self.sent, self.kept = body, 0, torch.empty(0)

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        self.kept = self._cross(h)
        return self._cross(self.body.forward(self.kept, None if mask is None else self._cross(mask)))

    def backward(self, h: Tensor, grad_z: Tensor, mask: Tensor | None) -> Tensor:
        assert torch.equal(h, self.kept)  # the client names the step; its h is not sent again
        return self._cross(self.body.backward(self.kept, self._cross(grad_z),
                                              None if mask is None else self._cross(mask)))

    def _cross(self, t: Tensor) -> Tensor:
        data = t.detach().numpy().tobytes()
        self.sent += len(data)
        return torch.from_numpy(np.frombuffer(data, dtype=t.detach().numpy().dtype).reshape(t.shape).copy())


def unsplit(model: Any, split: Split, prompt: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The reference: the whole HF model on inputs_embeds = [prompt; E(x)], the extended mask and labels."""
    tokens = model.get_input_embeddings()(batch["input_ids"])
    embeds = torch.cat([prompt.unsqueeze(0).expand(tokens.shape[0], -1, -1), tokens], dim=1)
    out = model(inputs_embeds=embeds, attention_mask=split.mask(batch), labels=split.labels(batch))
    return out.loss, out.logits


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(params=FAMILIES, ids=[f for f, _ in FAMILIES])
def family(request: pytest.FixtureRequest) -> Iterator[tuple[Any, str]]:
    name, task = request.param
    yield build(name, task), task


# --------------------------------------------------------------------------------------------------
# Parity with the unsplit model
# --------------------------------------------------------------------------------------------------


def test_split_loss_equals_unsplit(family: tuple[Any, str]) -> None:
    model, task = family
    split, body = cut(model)
    batch = make_batch(task)
    with torch.no_grad():
        ref_loss, ref_logits = unsplit(model, split, split.prompt, batch)
        z = body.forward(split.head(batch), split.body_mask(batch))
        loss, logits = split.tail(z, batch)
    assert abs(float(loss - ref_loss)) <= TOL
    real = split.mask(batch).bool() if task == "generation" else slice(None)
    # Llama's body runs without the padding mask: only padding positions' logits may differ.
    assert float((logits[real] - ref_logits[real]).abs().max()) <= TOL
    assert el2n_scores(logits, split.labels(batch), task).allclose(
        el2n_scores(ref_logits, split.labels(batch), task), atol=TOL)


def test_split_gradients_equal_unsplit(family: tuple[Any, str]) -> None:
    model, task = family
    split, body = cut(model)
    batch = make_batch(task)
    prompt = split.prompt.detach().clone().requires_grad_(True)
    ref_loss, _ = unsplit(model, split, prompt, batch)
    ref_loss.backward()
    assert prompt.grad is not None
    ref = {name: p.grad.clone() for name, p in split.tail_params.items() if p.grad is not None}
    assert set(ref) == set(split.tail_params)
    model.zero_grad(set_to_none=True)

    wire = Wire(body)
    loss, _ = split_step(split, wire, batch)
    assert abs(float(loss - ref_loss.detach())) <= TOL
    assert split.prompt.grad is not None and rel(split.prompt.grad, prompt.grad) <= TOL
    for name, p in split.tail_params.items():
        assert p.grad is not None and rel(p.grad, ref[name]) <= TOL, name
    b, s, d = batch["input_ids"].shape[0], batch["input_ids"].shape[1] + PROMPT, 64
    mask_bytes = 0 if task == "generation" else 2 * b * s  # BERT's bool mask, with each request
    assert wire.sent == 4 * (4 * b * s * d) + mask_bytes  # h, z, ∂z, ∂h: 4·B·S·d bytes each


def test_body_never_changes_and_gets_no_grad(family: tuple[Any, str]) -> None:
    model, task = family
    split, body = cut(model)
    frozen = [p for block in body.blocks for p in block.parameters()]
    frozen += [p for m in split.parts.entry_modules() for p in m.parameters()]
    frozen += [p for block in split.head_blocks for p in block.parameters()]
    before = [p.detach().clone() for p in frozen]
    prompt_before = split.prompt.detach().clone()
    optimizer = torch.optim.AdamW(split.trainable(), lr=1e-2)
    for step in range(3):
        split_step(split, body, make_batch(task, seed=step))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in frozen)
    assert all(torch.equal(p, q) for p, q in zip(frozen, before, strict=True))
    assert not torch.equal(split.prompt, prompt_before)
    assert all(not p.requires_grad for p in frozen)


def test_local_loss_never_calls_the_body(family: tuple[Any, str]) -> None:
    model, task = family
    split, body = cut(model)
    calls: list[str] = []
    hooks = [b.register_forward_hook(lambda *_: calls.append("body")) for b in body.blocks]
    batch = make_batch(task)
    loss, _ = split.local_loss(batch)
    loss.backward()
    split.local_scores(batch)
    assert calls == []
    assert split.prompt.grad is not None and all(p.grad is not None for p in split.tail_params.values())
    split_step(split, body, batch)  # the hooks do see the split path: forward, then backward's recompute
    assert len(calls) == 2 * len(body.blocks)
    for hook in hooks:
        hook.remove()


# --------------------------------------------------------------------------------------------------
# What trains and travels
# --------------------------------------------------------------------------------------------------


def test_tied_embedding_stays_frozen() -> None:
    model = build("tiny-llama", "generation")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tiny-llama ties, as SmolLM2
    split, _ = cut(model)
    names = set(split.tail_params)
    assert names == {"model.layers.3." + n for n in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight")} | {"model.norm.weight"}
    assert not model.lm_head.weight.requires_grad
    assert [p for p in model.parameters() if p.requires_grad] == list(split.tail_params.values())


def test_state_round_trip(family: tuple[Any, str]) -> None:
    model, task = family
    split, _ = cut(model)
    state = split.state()
    assert list(state)[0] == PROMPT_KEY and state[PROMPT_KEY].shape == (PROMPT, 64)
    assert all(k.startswith(TAIL_PREFIX) for k in list(state)[1:])
    assert {k: tuple(v.shape) for k, v in state.items()} == split.shapes()
    moved = {k: v + 1 for k, v in state.items()}
    split.load_state(moved)
    assert all(torch.equal(a, b) for a, b in zip(split.state().values(), moved.values(), strict=True))
    with pytest.raises(ValueError, match="sfprompt state: missing keys sfprompt.prompt"):
        split.load_state({k: v for k, v in state.items() if k != PROMPT_KEY})


def test_prompt_starts_from_vocabulary_embeddings() -> None:
    model = build("tiny-llama", "generation")
    split, _ = cut(model)
    rows = model.get_input_embeddings().weight
    assert all(any(torch.equal(v, r) for r in rows) for v in split.prompt)
    again = Split(build("tiny-llama", "generation"), head_layers=HEAD, tail_layers=TAIL, prompt_tokens=PROMPT,
                  seed=7)
    assert torch.equal(again.prompt, split.prompt)


# --------------------------------------------------------------------------------------------------
# EL2N and pruning
# --------------------------------------------------------------------------------------------------


def test_el2n_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax: [1/4, 3/4], [1/2, 1/2]
    scores = el2n_scores(logits, torch.tensor([1, 0]), "classification")
    assert scores.tolist() == pytest.approx([math.sqrt(2) / 4, math.sqrt(2) / 2], abs=1e-7)
    # generation: position t predicts label t+1; two answer tokens, position 2's prediction has no label
    gen_logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])  # [1, 3, 2]
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    want = (math.sqrt(2) * 3 / 4 + math.sqrt(2) / 2) / 2  # ‖[1/4, 3/4] − e0‖, ‖[1/2, 1/2] − e1‖
    assert el2n_scores(gen_logits, labels, "generation").tolist() == pytest.approx([want], abs=1e-7)
    nothing = torch.full((1, 3), IGNORE_INDEX)
    assert el2n_scores(gen_logits, nothing, "generation").tolist() == [0.0]
    with pytest.raises(ValueError, match="^task: 'regression' is not allowed; "):
        el2n_scores(logits, torch.tensor([1, 0]), "regression")


def test_el2n_matches_onehot_formula(family: tuple[Any, str]) -> None:
    model, task = family
    split, _ = cut(model)
    batch = make_batch(task)
    with torch.no_grad():
        _, logits = split.local_loss(batch)
    labels = split.labels(batch)
    if task == "generation":
        logits, labels = logits[:, :-1], labels[:, 1:]
    onehot = nn.functional.one_hot(labels.clamp(min=0), logits.shape[-1])
    norms = (logits.softmax(-1) - onehot).norm(dim=-1)
    if task == "generation":
        answer = labels != IGNORE_INDEX
        norms = (norms * answer).sum(1) / answer.sum(1)
    assert split.local_scores(batch).allclose(norms, atol=1e-6)


@given(st.lists(st.integers(0, 4), max_size=40), st.floats(0, 1, exclude_min=True))
def test_keep_hardest_keeps_exactly_the_highest(values: list[int], keep: float) -> None:
    scores = torch.tensor(values, dtype=torch.float32) / 4  # few distinct values: many ties
    kept = keep_hardest(scores, keep)
    n = len(values)
    count = max(1, math.floor(Fraction(repr(keep)) * n)) if n else 0
    brute = sorted(sorted(range(n), key=lambda i: (-values[i], i))[:count])  # ties: the lower index first
    assert kept.tolist() == brute
    assert kept_count(n, keep) == count


def test_kept_count_edges() -> None:
    assert kept_count(100, 0.29) == 29  # not 28: keep is the decimal it prints as
    assert kept_count(3, 0.1) == 1  # ⌊0.3⌋ = 0: a client still trains on its hardest example
    assert kept_count(7, 1.0) == 7 and kept_count(0, 0.5) == 0
    assert keep_hardest(torch.tensor([0.1, 0.9, 0.5, 0.9]), 0.5).tolist() == [1, 3]
    with pytest.raises(ValueError, match="^scores: "):
        keep_hardest(torch.tensor([0.1, float("nan")]), 0.5)


# --------------------------------------------------------------------------------------------------
# Configuration errors: one line naming the key, the value and what is allowed
# --------------------------------------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo[ValueError], key: str, value: str) -> None:
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{key}: {value} is not allowed; "), text


@pytest.mark.parametrize(("head", "tail", "key", "value"), [
    (2, 2, "sfprompt.head-layers", "2"),  # no body
    (3, 1, "sfprompt.head-layers", "3"),
    (0, 1, "sfprompt.head-layers", "0"),
    (1, 0, "sfprompt.tail-layers", "0"),
    (-1, 1, "sfprompt.head-layers", "-1"),
])
def test_cut_points_that_leave_no_part(head: int, tail: int, key: str, value: str) -> None:
    with pytest.raises(ValueError) as error:
        check_cut(head, tail, LAYERS)
    one_line(error, key, value)
    with pytest.raises(ValueError) as error:
        Split(build("tiny-bert", "classification"), head_layers=head, tail_layers=tail, prompt_tokens=2,
              seed=0)
    one_line(error, key, value)
    with pytest.raises(ValueError) as error:
        BodyCompute(build("tiny-llama", "generation"), head_layers=head, tail_layers=tail)
    one_line(error, key, value)


def test_settings_errors() -> None:
    assert SfPromptSettings() == SfPromptSettings(head_layers=1, tail_layers=1, prompt_tokens=8, keep=0.5)
    cases = [({"head_layers": 0}, "sfprompt.head-layers", "0"),
             ({"tail_layers": -2}, "sfprompt.tail-layers", "-2"),
             ({"prompt_tokens": 0}, "sfprompt.prompt-tokens", "0"),
             ({"keep": 0.0}, "sfprompt.keep", "0.0"),
             ({"keep": 1.5}, "sfprompt.keep", "1.5"),
             ({"keep": float("nan")}, "sfprompt.keep", "nan"),
             ({"local_epochs": 0}, "sfprompt.local-epochs", "0"),
             ({"lr": 0.0}, "sfprompt.lr", "0.0")]
    for fields, key, value in cases:
        with pytest.raises(ValueError) as error:
            SfPromptSettings(**fields)  # type: ignore[arg-type]
        one_line(error, key, value)
    for keep in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError) as error:
            keep_hardest(torch.ones(4), keep)
        one_line(error, "sfprompt.keep", repr(keep))
    with pytest.raises(ValueError) as error:
        Split(build("tiny-llama", "generation"), head_layers=1, tail_layers=1, prompt_tokens=0, seed=0)
    one_line(error, "sfprompt.prompt-tokens", "0")


def test_prompt_must_fit_learned_positions() -> None:
    split = Split(build("tiny-bert", "classification"), head_layers=1, tail_layers=1, prompt_tokens=250,
                  seed=0)
    with pytest.raises(ValueError) as error:
        split.head(make_batch("classification"))  # 250 + 9 > 256 positions
    one_line(error, "sfprompt.prompt-tokens", "250")


def test_unsupported_models_and_bad_requests() -> None:
    config = models.model_config("tiny-llama", "generation")
    config.num_hidden_layers, config.num_labels = LAYERS, 2
    with pytest.raises(ValueError, match="^model: 'llama LlamaForSequenceClassification' is not allowed; "):
        Split(LlamaForSequenceClassification(config), head_layers=1, tail_layers=1, prompt_tokens=2, seed=0)
    _, body = cut(build("tiny-llama", "generation"))
    with pytest.raises(ValueError, match=r"^h: 'torch.float32 \(2, 5, 32\)' is not allowed; "):
        body.forward(torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="^mask: "):
        body.forward(torch.zeros(2, 5, 64), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="^grad_z: "):
        body.backward(torch.zeros(2, 5, 64), torch.zeros(2, 4, 64))
