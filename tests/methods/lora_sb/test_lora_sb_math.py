"""LoRA-SB math: exact R averaging, init = best rank-r step, only R trains, merge parity, strict states."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.methods.lora_sb.init import init_factors, target_gradients
from pollinate.methods.lora_sb.layer import (
    Factors,
    SbLinear,
    factor_state,
    install_factors,
    load_r_state,
    r_state,
    sb_layers,
    wrap,
)
from pollinate.methods.lora_sb.rules import average_r

TARGETS = ("q_proj", "v_proj")
RANK = 4


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=64, vocab_size=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 6), generator=gen)  # (batch, time)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def _random_factors(layers: dict[str, SbLinear], seed: int) -> dict[str, Factors]:
    gen = torch.Generator().manual_seed(seed)
    return {name: (0.1 * torch.randn(RANK, m.base.in_features, generator=gen),  # A (r, n)
                   0.1 * torch.randn(m.base.out_features, RANK, generator=gen),  # B (m, r)
                   torch.randn(RANK, RANK, generator=gen))  # R (r, r)
            for name, m in layers.items()}


def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=torch.tensor([[1, 5, 9, 13, 2]])).logits  # (1, 5, vocab)


def test_averaging_r_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(7, 3, generator=gen, dtype=torch.float64)  # (m, r)
    a = torch.randn(3, 5, generator=gen, dtype=torch.float64)  # (r, n)
    rs = [torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(4)]  # K clients, (r, r) each
    weights = [1.0, 3.0, 2.0, 0.5]
    mean_r = average_r([{"layer.sb_R": r} for r in rs], weights)["layer.sb_R"]
    p = [w / sum(weights) for w in weights]
    mean_delta = sum(pk * b @ r @ a for pk, r in zip(p, rs, strict=True))
    torch.testing.assert_close(b @ mean_r @ a, mean_delta, rtol=0, atol=1e-12)


def test_average_r_refuses_other_keys() -> None:
    with pytest.raises(ValueError, match="sb_R"):
        average_r([{"layer.sb_A": torch.zeros(2, 2)}], [1.0])


def test_init_is_the_best_rank_r_approximation_of_the_sign_step() -> None:
    grad = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))  # (m, n)
    lr, rank = 0.01, 3
    a, b, r0 = init_factors({"w": grad}, rank, lr)["w"]
    g_hat = -lr * torch.sign(grad.double())  # computed independently of the module
    u, s, vh = torch.linalg.svd(g_hat, full_matrices=False)
    truncation = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]  # (m, n)
    layer = SbLinear(nn.Linear(9, 12), rank)
    layer.install(a, b, r0)
    delta = layer.delta_weight().double()  # s · B R0 A with s = 1
    torch.testing.assert_close(delta, truncation, rtol=0, atol=1e-6)
    # Eckart–Young: the error of the best rank-r approximation is the norm of the dropped singular values.
    error = torch.linalg.matrix_norm(g_hat - delta)
    torch.testing.assert_close(error, s[rank:].square().sum().sqrt(), rtol=1e-5, atol=0)


def test_factors_are_orthonormal_and_sign_fixed() -> None:
    grad = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    a, b, r0 = init_factors({"w": grad}, RANK, 1e-3)["w"]
    assert a.shape == (RANK, 16) and b.shape == (10, RANK) and r0.shape == (RANK, RANK)
    torch.testing.assert_close(a @ a.T, torch.eye(RANK), rtol=0, atol=1e-5)  # orthonormal rows
    torch.testing.assert_close(b.T @ b, torch.eye(RANK), rtol=0, atol=1e-5)  # orthonormal columns
    assert torch.equal(r0, torch.diag(torch.diagonal(r0))) and bool((torch.diagonal(r0) > 0).all())
    largest = b.gather(0, b.abs().argmax(dim=0, keepdim=True))  # (1, r)
    assert bool((largest > 0).all())


def test_init_is_deterministic() -> None:
    model = _tiny_llama()
    layers = wrap(model, TARGETS, RANK)
    first = init_factors(target_gradients(model, layers, _batches(2)), RANK, 1e-3)
    second = init_factors(target_gradients(model, layers, _batches(2)), RANK, 1e-3)
    assert first.keys() == second.keys()
    for name in first:
        assert all(torch.equal(x, y) for x, y in zip(first[name], second[name], strict=True))


def test_after_wrap_only_r_requires_grad() -> None:
    model = _tiny_llama()
    layers = wrap(model, TARGETS, RANK)
    assert len(layers) == 4  # 2 layers × (q, v)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.sb_R" for name in layers}
    assert not any("sb_A" in n or "sb_B" in n for n, _ in model.named_parameters())  # buffers
    assert {f"{name}.sb_A" for name in layers} <= set(model.state_dict())


def test_gradient_reaches_only_r() -> None:
    model = _tiny_llama()
    layers = wrap(model, TARGETS, RANK)
    install_factors(model, _random_factors(layers, seed=1))
    model(**_batches(1)[0]).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.endswith(".sb_R"), name


def test_wrapped_model_equals_base_before_install() -> None:
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    layers = wrap(model, TARGETS, RANK)
    assert not any(m.installed for m in layers.values())
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


def test_merge_parity_after_install() -> None:
    model = _tiny_llama()
    merged = copy.deepcopy(model)
    layers = wrap(model, TARGETS, RANK)
    install_factors(model, _random_factors(layers, seed=2))
    with torch.no_grad():
        for name, layer in layers.items():
            base = merged.get_submodule(name)
            assert isinstance(base, nn.Linear)
            base.weight.add_(layer.delta_weight())  # W + s·B R A, (m, n)
    torch.testing.assert_close(_logits(model), _logits(merged), rtol=0, atol=1e-5)


@pytest.mark.parametrize("clients", [2, 5])
def test_payload_is_r_squared_per_module_whatever_the_clients(clients: int) -> None:
    model = _tiny_llama()
    layers = wrap(model, TARGETS, RANK)
    states = [{k: v + i for k, v in r_state(model).items()} for i in range(clients)]
    mean = average_r(states, [1.0] * clients)
    assert set(mean) == {f"{name}.sb_R" for name in layers}
    assert all(v.shape == (RANK, RANK) for v in mean.values())
    assert sum(v.numel() for v in mean.values()) == len(layers) * RANK**2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(layers) * RANK**2


def test_r_state_round_trips_and_factors_travel_once() -> None:
    model, other = _tiny_llama(), _tiny_llama()
    layers, other_layers = wrap(model, TARGETS, RANK), wrap(other, TARGETS, RANK)
    install_factors(model, _random_factors(layers, seed=3))
    ab = factor_state(model)
    assert set(ab) == {f"{n}.sb_{x}" for n in layers for x in "AB"}
    r = r_state(model)
    install_factors(other, {n: (ab[f"{n}.sb_A"], ab[f"{n}.sb_B"], torch.zeros(RANK, RANK))
                            for n in other_layers})
    load_r_state(other, r)
    torch.testing.assert_close(_logits(other), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("corrupt", ["missing", "extra", "shape"])
def test_load_r_state_is_strict(corrupt: str) -> None:
    model = _tiny_llama()
    wrap(model, TARGETS, RANK)
    state = r_state(model)
    first = next(iter(state))
    if corrupt == "missing":
        del state[first]
    elif corrupt == "extra":
        state["model.embed_tokens.sb_R"] = torch.zeros(RANK, RANK)
    else:
        state[first] = torch.zeros(RANK + 1, RANK + 1)
    with pytest.raises(ValueError, match="lora-sb state"):
        load_r_state(model, state)


def test_target_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="fedsb.targets: nope_proj matches no linear layer"):
        wrap(_tiny_llama(), ("q_proj", "nope_proj"), RANK)


def test_bad_rank_and_double_wrap_are_refused() -> None:
    with pytest.raises(ValueError, match="fedsb.rank"):
        wrap(_tiny_llama(), TARGETS, 33)
    model = _tiny_llama()
    wrap(model, TARGETS, RANK)
    with pytest.raises(ValueError, match="already"):
        wrap(model, TARGETS, RANK)


def test_target_gradients_match_autograd() -> None:
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    layers = wrap(model, TARGETS, RANK)
    batches = _batches(3)
    sums = target_gradients(model, layers, batches)
    for batch in batches:  # independent: plain backward on the unwrapped model, .grad accumulates the sum
        reference(**batch).loss.backward()
    for name, grad in sums.items():
        expected = reference.get_submodule(name).weight.grad
        assert expected is not None
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert all(not m.base.weight.requires_grad for m in layers.values())  # restored
    assert all(p.grad is None for p in model.parameters())  # nothing kept
    assert sb_layers(model) == layers
