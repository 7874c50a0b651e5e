"""Local training: accumulation over micro-batches equals the full-batch step."""

import torch

from pollinate import models
from pollinate.data import encode_generation
from pollinate.methods.lora.adapter import LoraAdapter, LoraAdapterConfig
from pollinate.training import train_local


def _model() -> tuple[torch.nn.Module, LoraAdapter, int]:
    base, tokenizer = models.load_model("tiny-llama", "generation", seed=0)
    adapter = LoraAdapter(LoraAdapterConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                                            task="generation"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = adapter.attach(base)
    with torch.no_grad():  # a non-zero B, so every factor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return model, adapter, int(tokenizer.pad_token_id)


def test_micro_batches_give_the_full_batch_step() -> None:
    _, tokenizer = models.load_model("tiny-llama", "generation", seed=0)
    examples = [encode_generation(tokenizer, f"question {i}" * (i % 3 + 1), f"answer {i}" * (i % 4 + 1), 48)
                for i in range(8)]
    states = []
    for micro in (8, 3, 1):
        model, adapter, pad = _model()
        train_local(model, examples, steps=2, batch_size=8, lr=1e-2, pad_id=pad, seed=0, micro_batch=micro)
        states.append(adapter.trainable_state(model))
    for other in states[1:]:
        for key, value in states[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-6)
