"""LoRA adapter: only adapter tensors travel, a state round-trips exactly, bad states are refused."""

import pytest
import torch

from pollinate import models
from pollinate.methods import method_class, names, register
from pollinate.methods.lora.adapter import LoraAdapter, LoraAdapterConfig
from pollinate.methods.lora.method import LoraMethod

CONFIG = LoraAdapterConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), task="generation")


def _adapted(seed: int) -> tuple[LoraAdapter, torch.nn.Module]:
    base, _ = models.load_model("tiny-llama", "generation", seed=0)
    adapter = LoraAdapter(CONFIG)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return adapter, adapter.attach(base)


def _train_a_little(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_only_adapter_tensors_travel() -> None:
    adapter, model = _adapted(1)
    state = adapter.trainable_state(model)
    assert state and all("lora_A" in k or "lora_B" in k for k in state)
    # 2 layers × (q, v) × (A, B); each A is r×n, each B is m×r.
    assert len(state) == 8
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in state.values()) == trainable


def test_state_round_trips_into_another_process_model() -> None:
    adapter, model = _adapted(1)
    _train_a_little(model)
    state = adapter.trainable_state(model)
    other_adapter, other = _adapted(2)  # different initial A
    other_adapter.load_state(other, state)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(input_ids=ids).logits, other(input_ids=ids).logits,
                               rtol=0, atol=0)


def test_delta_weights_are_scaled_products() -> None:
    adapter, model = _adapted(1)
    _train_a_little(model)
    state = adapter.trainable_state(model)
    deltas = adapter.delta_weights(model)
    assert len(deltas) == 4
    name = next(n for n in deltas if n.endswith("layers.0.self_attn.q_proj"))
    a = next(v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    torch.testing.assert_close(deltas[name], CONFIG.scale * b @ a)


@pytest.mark.parametrize("corrupt", ["missing", "extra", "shape"])
def test_bad_states_are_refused(corrupt: str) -> None:
    adapter, model = _adapted(1)
    state = adapter.trainable_state(model)
    key = next(iter(state))
    if corrupt == "missing":
        del state[key]
    elif corrupt == "extra":
        state["model.embed_tokens.weight"] = torch.zeros(3)
    else:
        state[key] = torch.zeros(1, *state[key].shape[1:])
    with pytest.raises(ValueError, match="adapter state"):
        adapter.load_state(model, state)


def test_targets_that_match_nothing_are_refused() -> None:
    base, _ = models.load_model("tiny-llama", "generation", seed=0)
    bad = LoraAdapter(LoraAdapterConfig(rank=4, alpha=8.0, targets=("qkv",), task="generation"))
    with pytest.raises(ValueError, match=r"^lora.targets: qkv matches no linear layer"):
        bad.attach(base)


def test_registry() -> None:
    assert "lora" in names() and method_class("lora") is LoraMethod
    with pytest.raises(ValueError, match="method"):
        method_class("no-such-method")
    with pytest.raises(ValueError, match="registered twice"):
        register("lora", "pollinate.methods.lora.method:LoraMethod")


def test_classification_head_travels_and_frozen_a_does_not() -> None:
    base, _ = models.load_model("tiny-bert", "classification", seed=0)
    adapter = LoraAdapter(LoraAdapterConfig(rank=2, alpha=4.0, targets=("query",), task="classification"))
    model = adapter.attach(base)
    keys = set(adapter.trainable_state(model))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    adapter.freeze_a(model)
    assert not any("lora_A" in k for k in adapter.trainable_state(model))
    assert any("lora_B" in k for k in adapter.trainable_state(model))


def test_reset_gives_a_zero_update_and_a_seeded_a() -> None:
    adapter, model = _adapted(1)
    _train_a_little(model)
    adapter.reset(model, seed=5)
    assert all(torch.count_nonzero(d) == 0 for d in adapter.delta_weights(model).values())
    first = adapter.trainable_state(model)
    adapter.reset(model, seed=5)
    again = adapter.trainable_state(model)
    assert all(torch.equal(first[k], again[k]) for k in first)
