"""Edge export of SFPrompt checkpoints: the run's prompted model, the trained soft prompt inside the graph.

An SFPrompt checkpoint holds the soft prompt p [P, d] and the tail's trained weights
(``sfprompt.safetensors``, the export view's ``prompt_state``), no peft view. The export rebuilds the
server's model (:func:`pollinate.methods.sfprompt.method.prompted_model`: the run's base, cut at the run's
points, the checkpoint's prompt and tail loaded) and exports a graph with the inputs and outputs of any
other bundle, so the runner does not change and the signed manifest covers every file as before:

classification
    ``(input_ids, attention_mask) -> logits``: the prompted model itself, in the classifier wrapper
    (:class:`~pollinate.edge.export.SequenceClassifier`): the prompt goes before ``[CLS]`` at positions
    0..P-1, the input's P.. (its padding mask behind P ones), as the server evaluates.
generation
    The run's causal LM with the trained tail, behind a constant prefix (:class:`PrefixedCausalLM`). A
    causal model's prompt positions come first and attend only to each other, so their keys and values
    in every layer do not depend on the input: :func:`prompt_cache` computes them once, and the graph
    prepends them to the past it is given and P ones to the mask, leaving them out of the present it
    returns. The positions come from the mask, so the input's first token sits at P, as in the prompted
    model (which puts the prompt at 0..P-1); the runner's cache holds its own tokens only, as with any
    other bundle. Each step concatenates P more keys and values per layer (P = 8 on SmolLM2: 0.4 MB of
    constants in all).

A graph of the prompt prepended at every call (a prefill-only branch) would need a condition on the past
length inside the graph; the constant prefix needs none. The P positions the prompt takes come off the
input's: the manifest's ``graph.max_positions`` and ``tokenizer.max_length`` are the model's less P.
There is no adapter: the bundle is merged (``--adapters separate`` is refused before anything is built).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from pollinate import models
from pollinate.config import RunConfig
from pollinate.edge import adapters, manifest
from pollinate.edge.bundle_pb2 import Adapter, AdapterMode, BaseModel, BundleManifest
from pollinate.edge.export import (
    GRAPH_FILE,
    CausalLMWithCache,
    Contents,
    SequenceClassifier,
    base_message,
    finish_bundle,
    label_names,
    save_graph,
)
from pollinate.methods.sfprompt.method import PromptedModel, prompted_model
from pollinate.methods.sfprompt.split import TAIL_PREFIX

__all__ = ["PrefixedCausalLM", "build_prompted", "load_prompted", "prompt_cache"]

_CLASSIFIER = f"{TAIL_PREFIX}classifier.weight"
"""A BERT classifier's output head in the prompt state: [C, d], its rows the classes."""


class PrefixedCausalLM(nn.Module):
    """:class:`~pollinate.edge.export.CausalLMWithCache` behind constant past keys and values of P
    positions (the soft prompt's: :func:`prompt_cache`).

    ``forward(input_ids (B, S), attention_mask (B, L+S), *past)``, each past (B, kv_heads, L, head_dim),
    as the plain graph takes them: the prefix goes before every past and P ones before the mask, so the
    model runs over P+L+S positions with the new tokens at P+L.. (left padding included: positions come
    from the mask). Returns the logits (B, S, V) and the present without the prefix, each
    (B, kv_heads, L+S, head_dim).
    """

    def __init__(self, model: nn.Module, prefix: list[Tensor]) -> None:
        super().__init__()
        self.inner = CausalLMWithCache(model, len(prefix) // 2)
        self.tokens = int(prefix[0].shape[2])
        for i, tensor in enumerate(prefix):  # constants of the graph
            self.register_buffer(f"prefix_{i}", tensor.detach().clone())  # (1, kv_heads, P, head_dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        batch = input_ids.shape[0]
        full = [torch.cat([getattr(self, f"prefix_{i}").expand(batch, -1, -1, -1), p], dim=2)
                for i, p in enumerate(past)]  # each (B, kv_heads, P+L, head_dim)
        ones = torch.ones(batch, self.tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        logits, *present = self.inner(input_ids, torch.cat([ones, attention_mask], dim=1), *full)
        return (logits, *[t[:, :, self.tokens:] for t in present])


@torch.no_grad()
def prompt_cache(model: nn.Module, prompt: Tensor) -> list[Tensor]:
    """The prompt's keys and values in every layer of causal LM ``model``, at positions 0..P-1 as the
    prompted model places it: ``key_0, value_0, key_1, ...`` each (1, kv_heads, P, head_dim).

    Causal attention makes them the same whatever input follows the prompt.
    """
    tokens = prompt.shape[0]
    out = model(inputs_embeds=prompt.unsqueeze(0), attention_mask=torch.ones(1, tokens, dtype=torch.long),
                position_ids=torch.arange(tokens).unsqueeze(0), use_cache=True)  # prompt: [1, P, d]
    return [t.contiguous() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


def load_prompted(checkpoint: adapters.Checkpoint
                  ) -> tuple[PromptedModel, PreTrainedTokenizerBase, BaseModel]:
    """The run's prompted model (eval mode) with the checkpoint's prompt and tail, its tokenizer, and the
    manifest's entry of the base (weights before the tail was loaded).

    A classifier gets as many classes as the checkpoint's trained head has rows.
    """
    assert checkpoint.prompt_state is not None
    cfg = RunConfig.from_run_config(checkpoint.run_config)
    state = load_file(str(checkpoint.prompt_state))
    classes = int(state[_CLASSIFIER].shape[0]) if _CLASSIFIER in state else 2
    base, tokenizer = models.load_model(cfg.model, cfg.task, num_labels=classes, seed=cfg.seed)
    info = base_message(checkpoint, base)
    model = prompted_model(base, cfg.sfprompt, cfg.seed)
    model.split.load_state(state)
    return model, tokenizer, info


def _export(model: PromptedModel, task: str, path: Path) -> None:
    """Save the graph of the prompted model: the classifier as it is, the causal LM behind its prefix."""
    config: Any = model.base.config
    wrapper: nn.Module
    if task == "classification":
        wrapper = SequenceClassifier(model)
    else:
        wrapper = PrefixedCausalLM(model.base, prompt_cache(model.base, model.prompt.detach()))
    save_graph(wrapper, task, config, path)


def build_prompted(checkpoint: adapters.Checkpoint, out: Path, quantization: str, key: Any) -> BundleManifest:
    """Export a prompt checkpoint's model (see the module) into ``out``, quantise it and write the tokenizer
    and the manifest; the manifest's adapter entry names the checkpoint's prompt state (no file)."""
    assert checkpoint.prompt_state is not None
    task = str(checkpoint.run_config["task"])
    model, tokenizer, base = load_prompted(checkpoint)
    _export(model, task, out / GRAPH_FILE)
    entry = Adapter(base_weights_sha256=base.weights_sha256, source=checkpoint.folder.name,
                    round=checkpoint.round, source_sha256=manifest.sha256_file(checkpoint.prompt_state),
                    modules_to_save=_trained_modules(model))
    config: Any = model.base.config
    labels = label_names(checkpoint.run_config, int(config.num_labels)) if task == "classification" else []
    contents = Contents(task=task, base=base, adapter=entry, model=model.base, tokenizer=tokenizer,
                        mode=AdapterMode.MERGED, lora_inputs=[], labels=labels,
                        reserved=model.split.prompt_tokens)
    return finish_bundle(out, contents, quantization, key)


def _trained_modules(model: PromptedModel) -> list[str]:
    """What the checkpoint trained and the graph holds merged: ``prompt`` and the tail's top modules
    (``model.layers.3``, ``model.norm``, ``classifier`` ...)."""
    tail = [*model.split.tail_blocks, *model.split.parts.exit_modules()]
    names = {id(m): n for n, m in model.base.named_modules()}
    trained = {id(p) for p in model.split.tail_params.values()}
    return ["prompt", *sorted(names[id(m)] for m in tail if any(id(p) in trained for p in m.parameters()))]
