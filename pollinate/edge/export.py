"""Export a federated checkpoint to an edge bundle: ONNX graph, tokenizer, adapters, signed manifest.

The causal LM is wrapped in a module whose inputs and outputs are flat tensors (``input_ids``,
``attention_mask``, one ``past_key_values.{i}.key`` / ``.value`` per layer; ``logits`` and
``present.{i}.key`` / ``.value``) with dynamic batch, sequence and past lengths, so one graph serves
both the prefill (past length 0) and every decoding step. ``torch.onnx.export(dynamo=True)`` traces it.

Two adapter modes:

``merged``
    ``merge_and_unload()``, then export and optimise: the fastest graph; a new round needs a new graph.
``separate``
    The graph keeps the LoRA branches, with the LoRA weights as overridable inputs (default zero: the
    graph alone is the base model) and a LoRA scale of 1; each checkpoint becomes an onnxruntime
    adapter file (:mod:`pollinate.edge.adapters`) that the runner activates. A new round ships only
    its adapter file (``pollinate export CHECKPOINT --adapter-for BUNDLE``).

Updates a strategy merged into the base weights during the federation (the file the checkpoint's
``manifest.json`` names, from the method's export view) are applied to the base before anything else:
they are part of the base that the bundle's identity (``weights_sha256``) and its adapters refer to.

A checkpoint of a soft prompt and trained blocks instead of a peft view (SFPrompt's; its export view's
``prompt_state``) exports merged only, with the prompt inside a graph of the same inputs and outputs
(:mod:`pollinate.edge.prompted`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from torch.export import Dim
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from pollinate import models
from pollinate.edge import adapters, manifest, quantize
from pollinate.edge.adapters import ADAPTER_MODES
from pollinate.edge.bundle_pb2 import (
    Adapter,
    AdapterMode,
    BaseModel,
    BundleManifest,
    Graph,
    LoraInput,
    Quantization,
    Task,
    TokenizerInfo,
)

__all__ = [
    "CausalLMWithCache",
    "Contents",
    "SequenceClassifier",
    "apply_base_delta",
    "base_message",
    "checkpoint_base",
    "class_count",
    "export_bundle",
    "finish_bundle",
    "label_names",
    "load_checkpoint",
    "prepare_out",
    "run_labels",
    "save_graph",
    "weights_sha256",
]

GRAPH_FILE, TOKENIZER_FILE, TEMPLATE_FILE, ADAPTER_DIR = (
    "model.onnx", "tokenizer.json", "chat_template.jinja", "adapters")
DEFAULT_MAX_NEW_TOKENS = 128
_QUANT_ENUM = {"none": Quantization.NONE, "int8": Quantization.INT8, "int4": Quantization.INT4}
_RANK_AXIS = {".lora_A.": 0, ".lora_B.": 1}  # A is (r, in), B is (out, r)
# Example sizes for tracing: distinct and above 1, so torch.export keeps every axis symbolic.
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 5, 3


# --------------------------------------------------------------------------------------------------
# Wrappers with flat inputs and outputs
# --------------------------------------------------------------------------------------------------


class CausalLMWithCache(nn.Module):
    """A causal LM with flat KV-cache tensors in and out.

    ``forward(input_ids (B, S), attention_mask (B, P+S), *past)`` where ``past`` is ``key_0, value_0,
    key_1, ...``, each (B, kv_heads, P, head_dim); returns ``(logits (B, S, V), *present)`` with
    present tensors of length P+S. Positions come from the mask (``cumsum - 1``), as transformers'
    ``generate`` computes them, so left-padded batches decode correctly.
    """

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        seq = input_ids.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]  # (B, S)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]  # each (B, kv_heads, P+S, head_dim)
        return (out.logits, *present)


class SequenceClassifier(nn.Module):
    """A sequence classifier: ``forward(input_ids (B, S), attention_mask (B, S)) -> logits (B, C)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits


def _kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """``past_key_values.0.key, past_key_values.0.value, ...`` (or ``present.*``)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


# --------------------------------------------------------------------------------------------------
# torch.onnx.export
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress lines, warnings and pass logs."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _trace(wrapper: nn.Module, task: str, config: Any) -> Any:
    """Export ``wrapper`` with dynamo and named dynamic axes; returns the unoptimised ONNXProgram."""
    batch, seq = Dim("batch"), Dim("sequence")
    ids = torch.randint(0, 8, (_EXAMPLE_BATCH, _EXAMPLE_SEQ))
    if task == "classification":
        mask = torch.ones_like(ids)
        args: tuple[torch.Tensor, ...] = (ids, mask)
        dynamic: dict[str, Any] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        names_in, names_out = ["input_ids", "attention_mask"], ["logits"]
    else:
        layers, kv_heads, head_dim = _kv_shape(config)
        past = [torch.randn(_EXAMPLE_BATCH, kv_heads, _EXAMPLE_PAST, head_dim) for _ in range(2 * layers)]
        mask = torch.ones(_EXAMPLE_BATCH, _EXAMPLE_PAST + _EXAMPLE_SEQ, dtype=torch.long)
        args = (ids, mask, *past)
        past_dim = Dim("past_sequence")
        dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim("total_sequence")},
                   "past": tuple({0: batch, 2: past_dim} for _ in past)}
        names_in = ["input_ids", "attention_mask", *past_names(layers)]
        names_out = ["logits", *past_names(layers, "present")]
    with _quiet(), torch.no_grad():
        return torch.onnx.export(wrapper, args, dynamo=True, optimize=False, dynamic_shapes=dynamic,
                                 input_names=names_in, output_names=names_out, verbose=False)


def _promote_adapter_weights(program: Any, adapter_params: set[str]) -> list[LoraInput]:
    """Turn the adapter's initializers into overridable graph inputs named by peft's saved keys.

    The rank axis of each LoRA factor becomes the symbolic dimension ``lora_rank``.
    """
    graph = program.model.graph
    inputs: list[LoraInput] = []
    for name, value in list(graph.initializers.items()):
        if name not in adapter_params:
            continue
        value.name = adapters.graph_input_name(name)
        dims: list[Any] = list(value.shape)
        axis = next((a for marker, a in _RANK_AXIS.items() if marker in value.name), None)
        if axis is not None:
            dims[axis] = "lora_rank"
        value.shape = ir.Shape(dims)
        graph.inputs.append(value)
        inputs.append(LoraInput(name=value.name, shape=[-1 if isinstance(d, str) else int(d) for d in dims]))
    missing = {adapters.graph_input_name(p) for p in adapter_params} - {i.name for i in inputs}
    assert not missing, f"adapter weights not found in the exported graph: {sorted(missing)[:3]}"
    return sorted(inputs, key=lambda i: i.name)


def _export_graph(model: nn.Module, task: str, config: Any, path: Path,
                  adapter_params: set[str] | None) -> list[LoraInput]:
    """Trace, optimise and save ``model`` in the task's wrapper; adapter weights become inputs when
    ``adapter_params``."""
    wrapper: nn.Module
    if task == "classification":
        wrapper = SequenceClassifier(model)
    else:
        wrapper = CausalLMWithCache(model, _kv_shape(config)[0])
    return save_graph(wrapper, task, config, path, adapter_params)


def save_graph(wrapper: nn.Module, task: str, config: Any, path: Path,
               adapter_params: set[str] | None = None) -> list[LoraInput]:
    """Trace, optimise and save a wrapper with the task's flat inputs and outputs (:func:`_trace`)."""
    program = _trace(wrapper.eval(), task, config)
    lora_inputs = _promote_adapter_weights(program, adapter_params) if adapter_params else []
    with _quiet(), _hidden_defaults(program.model.graph, {i.name for i in lora_inputs}):
        program.optimize()  # folds the base weights' transposes; sees the adapter weights as plain inputs
    with _quiet():
        program.save(str(path), external_data=False)
    return lora_inputs


@contextlib.contextmanager
def _hidden_defaults(graph: Any, names: set[str]) -> Iterator[None]:
    """Detach the default values of the inputs ``names`` while the block runs, then restore them.

    The optimiser's rewrite rules read an initializer's value even when it is also a graph input:
    with the zero defaults in view it would drop a classifier's zero bias or a zero LoRA branch.
    """
    hidden = [(value, value.const_value) for value in graph.inputs if value.name in names]
    for value, _ in hidden:
        graph.initializers.pop(value.name)
        value.const_value = None
    try:
        yield
    finally:
        for value, tensor in hidden:
            value.const_value = tensor
            graph.register_initializer(value)


# --------------------------------------------------------------------------------------------------
# Preparing the model
# --------------------------------------------------------------------------------------------------


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over a model's weights as fp32: sorted names, shapes and bytes (the base's identity)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().to(torch.float32).contiguous().numpy()
        digest.update(f"{name}:{tuple(array.shape)}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def class_count(adapter: adapters.PeftAdapter) -> int:
    """Classes of a classification checkpoint: rows of its trained head (2 when none is saved)."""
    for module in adapter.modules_to_save:
        for key, value in adapter.tensors.items():
            if key.endswith(f".{module}.weight") and value.ndim == 2:
                return int(value.shape[0])
    return 2


def run_labels(run_config: dict[str, Any], count: int) -> list[str] | None:
    """Class names of the run's dataset when it can be read and has ``count`` of them, else None."""
    try:
        from pollinate.config import RunConfig
        from pollinate.data import load_dataset

        cfg = RunConfig.from_run_config(run_config)
        names = list(load_dataset(cfg.dataset_name, cfg.task).features["label"].names)
    except (ValueError, OSError, KeyError, AttributeError, ImportError):
        return None
    return [str(n) for n in names] if len(names) == count else None


def label_names(run_config: dict[str, Any], count: int) -> list[str]:
    """Class names of the run's dataset when it can be read, else ``"0" .. "count-1"``."""
    return run_labels(run_config, count) or [str(i) for i in range(count)]


@torch.no_grad()
def apply_base_delta(base: nn.Module, path: Path | None) -> None:
    """W += ΔW for every module of a checkpoint's merged base updates (None: nothing to do)."""
    if path is None:
        return
    from safetensors.torch import load_file

    from pollinate.aggregation import apply_delta, from_flat

    delta = from_flat(load_file(str(path)))
    weights: dict[str, torch.Tensor] = {}
    for name, d in delta.items():
        weight = _delta_target(base, name.removeprefix("base_model.model."), path)  # peft name -> base
        if tuple(weight.shape) != d.shape:
            raise ValueError(f"{path}: {name} has a delta of shape {d.shape}, the weight "
                             f"{tuple(weight.shape)}")
        weights[name] = weight
    apply_delta(weights, delta)


def _delta_target(base: nn.Module, name: str, path: Path) -> torch.Tensor:
    """The weight a delta entry names: a module's ``weight``, or a parameter by its full name."""
    try:
        weight: torch.Tensor = base.get_submodule(name).weight  # type: ignore[assignment]
        return weight
    except AttributeError:
        pass
    try:
        return base.get_parameter(name)
    except AttributeError:
        raise ValueError(f"{path}: {name} is not a module or parameter of the base model") from None


def _seeded(name: str, task: str) -> bool:
    """Whether :func:`pollinate.models.load_model` draws some weights of this base from the seed."""
    return name in ("tiny-llama", "tiny-bert") or task == "classification"


def checkpoint_base(checkpoint: adapters.Checkpoint, adapter: adapters.PeftAdapter
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The run's base model (fp32, eval mode) with the checkpoint's merged base updates applied: the base
    its adapter was trained on. A classifier gets as many classes as the adapter's trained head."""
    cfg = checkpoint.run_config
    task = cfg["task"]
    num_labels = class_count(adapter) if task == "classification" else 2
    base, tokenizer = models.load_model(cfg["model"], task, num_labels=num_labels,
                                        seed=int(cfg.get("seed", 0)))
    apply_base_delta(base, checkpoint.base_delta)
    return base, tokenizer


def load_checkpoint(checkpoint: adapters.Checkpoint, adapter: adapters.PeftAdapter
                    ) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The checkpoint's model as a peft model in eval mode: :func:`checkpoint_base` with its adapter
    (``merge_and_unload()`` of it is the plain model that ``--adapters merged`` exports)."""
    base, tokenizer = checkpoint_base(checkpoint, adapter)
    return PeftModel.from_pretrained(base, str(checkpoint.folder)).eval(), tokenizer


def _load(checkpoint: adapters.Checkpoint, adapter: adapters.PeftAdapter
          ) -> tuple[PeftModel, PreTrainedTokenizerBase, BaseModel]:
    """The run's base model with the checkpoint's adapter, and the base's manifest entry."""
    base, tokenizer = checkpoint_base(checkpoint, adapter)
    info = base_message(checkpoint, base)
    peft_model = PeftModel.from_pretrained(base, str(checkpoint.folder))
    return peft_model.eval(), tokenizer, info


def base_message(checkpoint: adapters.Checkpoint, base: nn.Module) -> BaseModel:
    """The manifest's entry of the run's base model ``base`` (before anything trained is loaded)."""
    cfg = checkpoint.run_config
    config: Any = getattr(base, "config", None)
    return BaseModel(
        name=str(cfg["model"]), architecture=type(base).__name__,
        model_type=str(getattr(config, "model_type", "")),
        num_parameters=sum(p.numel() for p in base.parameters()), seed=int(cfg.get("seed", 0)),
        weights_sha256=weights_sha256(base), seeded=_seeded(cfg["model"], cfg["task"]),
        base_delta_sha256=checkpoint.base_delta_sha256)


@torch.no_grad()
def _as_bare_adapter_graph(model: PeftModel) -> set[str]:
    """Scale 1, zero LoRA factors, the base head in trained heads; returns the adapter's parameter names.

    Exported this way the graph alone computes the base model; adapter files supply the rest.
    """
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                module.scaling[name] = 1.0  # adapter files carry B pre-scaled
            factors: list[Any] = [module.lora_A, module.lora_B]  # ModuleDicts of nn.Linear
            for factor in factors:
                for layer in factor.values():
                    layer.weight.zero_()
        elif isinstance(module, ModulesToSaveWrapper):
            for copy in module.modules_to_save.values():
                copy.load_state_dict(module.original_module.state_dict())
    return {f"model.{n}" for n, _ in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n}


# --------------------------------------------------------------------------------------------------
# Tokenizer and manifest
# --------------------------------------------------------------------------------------------------


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, model: nn.Module, task: str,
                    out: Path, reserved: int = 0) -> TokenizerInfo:
    """Write ``tokenizer.json`` (no padding or truncation baked in) and the chat template; the longest
    input leaves ``reserved`` of the model's positions to a soft prompt inside the graph."""
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(out / TOKENIZER_FILE))
    eos: list[int] = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in generation_eos if isinstance(generation_eos, list) else [generation_eos]:
        if token is not None and int(token) not in eos:
            eos.append(int(token))
    config: Any = getattr(model, "config", None)
    positions = int(getattr(config, "max_position_embeddings", 0) or 512) - reserved
    info = TokenizerInfo(
        file=TOKENIZER_FILE, eos_token_ids=eos, pad_token_id=int(tokenizer.pad_token_id or 0),
        bos_token_id=-1 if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        max_length=min(positions, int(tokenizer.model_max_length or positions)))
    template = getattr(tokenizer, "chat_template", None)
    if task == "generation" and isinstance(template, str) and template:
        (out / TEMPLATE_FILE).write_text(template, encoding="utf-8")
        info.chat_template_file = TEMPLATE_FILE
    return info


def _graph_message(path: Path, config: Any, task: str, quantization: str,
                   lora_inputs: list[LoraInput], reserved: int = 0) -> Graph:
    """The manifest's description of the saved graph; ``reserved`` of the model's positions are taken by
    a soft prompt inside it, so ``max_positions`` counts those left to the input and the answer."""
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = Graph(file=path.name, opset=opset, ir_version=proto.ir_version,
                  quantization=_QUANT_ENUM[quantization],
                  vocab_size=int(getattr(config, "vocab_size", 0) or 0),
                  max_positions=max(int(getattr(config, "max_position_embeddings", 0) or 0) - reserved, 0),
                  lora_inputs=lora_inputs)
    if quantization != "none":
        graph.quantization_block_size = quantize.BLOCK_SIZE
    if task == "generation":
        graph.num_layers, graph.num_kv_heads, graph.head_dim = _kv_shape(config)
    return graph


def _producer() -> dict[str, str]:
    """Versions of the tools that made the bundle."""
    names = ("pollinate", "torch", "transformers", "peft", "onnx", "onnxruntime", "onnxscript")
    versions: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def prepare_out(out: Path) -> None:
    """Create ``out``; refuse a file or a non-empty folder (nothing of the user's is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {str(out)!r} exists and is not an empty folder; choose a new path")
    out.mkdir(parents=True, exist_ok=True)


def _write_adapter(out: Path, checkpoint: adapters.Checkpoint, peft_adapter: adapters.PeftAdapter,
                   lora_inputs: list[LoraInput], entry: Adapter) -> None:
    """The checkpoint's adapter as ``out/adapters/<checkpoint>.onnx_adapter``; records it in ``entry``."""
    tensors = adapters.adapter_tensors(peft_adapter)
    adapters.check_fits(tensors, lora_inputs, f"checkpoint {checkpoint.folder}")
    name = f"{ADAPTER_DIR}/{checkpoint.folder.name}{adapters.ADAPTER_SUFFIX}"
    adapters.write_adapter_file(tensors, out / name, version=checkpoint.round)
    digest = manifest.digest(out, name)
    entry.file, entry.sha256, entry.size = digest.name, digest.sha256, digest.size


def export_bundle(source: Path, out: Path, *, quantization: str = "none", adapter_mode: str = "merged",
                  sign_key: Path | None = None) -> BundleManifest:
    """Export a checkpoint (or a run folder's latest) to an edge bundle folder.

    Parameters
    ----------
    source : Path
        A run folder (its ``LATEST`` checkpoint is used) or a checkpoint folder inside a run folder.
    out : Path
        The bundle folder to create; it must not exist or be empty.
    quantization : {"none", "int8", "int4"}
        Weight quantisation of the graph (the LoRA branches of a separate graph stay fp32).
    adapter_mode : {"merged", "separate"}
        Merge the adapter into the weights, or keep it as an adapter file the runner activates. A
        checkpoint without an adapter (FedKSeed ``full``, SFPrompt's prompt and tail) exports merged only.
    sign_key : Path, optional
        An Ed25519 private key (``pollinate keys generate``); the manifest is signed with it.

    Returns
    -------
    BundleManifest
        The manifest written to ``out/manifest.pb``.

    Raises
    ------
    ValueError
        On a bad choice, a bad source or output path, an unreadable key, or an unsupported adapter.
    """
    quantize.check_choice("--quantize", quantization, quantize.QUANTIZATIONS)
    quantize.check_choice("--adapters", adapter_mode, ADAPTER_MODES)
    key = manifest.load_private_key(sign_key) if sign_key is not None else None
    checkpoint = adapters.resolve_checkpoint(source)
    if adapter_mode == "separate":
        _check_separate(checkpoint)
    peft_adapter = adapters.read_adapter(checkpoint.folder) if checkpoint.prompt_state is None else None
    prepare_out(out)
    try:
        if peft_adapter is None:  # a soft prompt and trained blocks (SFPrompt), no peft view
            from pollinate.edge.prompted import build_prompted

            return build_prompted(checkpoint, out, quantization, key)
        return _build(checkpoint, peft_adapter, out, quantization, adapter_mode, key)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written bundle behind
        raise


def _check_separate(checkpoint: adapters.Checkpoint) -> None:
    """Refuse ``--adapters separate`` for a checkpoint without an adapter, in one line."""
    if checkpoint.prompt_state is not None:
        raise ValueError(f"--adapters: 'separate' is not allowed for this checkpoint; its method "
                         f"({checkpoint.method}) trained a soft prompt and whole blocks, no adapter: "
                         "use --adapters merged")
    if not checkpoint.adapter:
        raise ValueError(f"--adapters: 'separate' is not allowed for this checkpoint; its method "
                         f"({checkpoint.method}) trained every weight, so there is no adapter to ship: "
                         "use --adapters merged")


def _build(checkpoint: adapters.Checkpoint, peft_adapter: adapters.PeftAdapter, out: Path,
           quantization: str, adapter_mode: str, key: Any) -> BundleManifest:
    """Export, quantise, write the tokenizer and adapter files and the manifest into ``out``."""
    task = checkpoint.run_config["task"]
    peft_model, tokenizer, base = _load(checkpoint, peft_adapter)
    config = peft_model.get_base_model().config
    source_sha = manifest.sha256_file(checkpoint.folder / "adapter_model.safetensors")
    entry = adapters.adapter_message(peft_adapter, checkpoint, base.weights_sha256, source_sha)
    graph_path = out / GRAPH_FILE
    if adapter_mode == "merged":
        lora_inputs = _export_graph(peft_model.merge_and_unload(), task, config, graph_path, None)
    else:
        params = _as_bare_adapter_graph(peft_model)
        lora_inputs = _export_graph(peft_model, task, config, graph_path, params)
        _write_adapter(out, checkpoint, peft_adapter, lora_inputs, entry)
    labels = label_names(checkpoint.run_config, class_count(peft_adapter)) if task == "classification" else []
    contents = Contents(task=task, base=base, adapter=entry, model=peft_model.get_base_model(),
                        tokenizer=tokenizer, lora_inputs=lora_inputs, labels=labels,
                        mode=AdapterMode.SEPARATE if adapter_mode == "separate" else AdapterMode.MERGED)
    return finish_bundle(out, contents, quantization, key)


@dataclass(frozen=True)
class Contents:
    """What a bundle's manifest says of its exported graph (:func:`finish_bundle`)."""

    task: str
    base: BaseModel
    adapter: Adapter
    """What was merged (MERGED), or the bundle's adapter file (SEPARATE)."""
    model: nn.Module
    """The transformers model the graph was exported from: its config, its generation config."""
    tokenizer: PreTrainedTokenizerBase
    mode: AdapterMode
    lora_inputs: list[LoraInput]
    labels: list[str]
    """The class names (classification)."""
    reserved: int = 0
    """Positions of the model taken by a soft prompt inside the graph, not left to the input."""


def finish_bundle(out: Path, contents: Contents, quantization: str, key: Any) -> BundleManifest:
    """Quantise the saved graph, write the tokenizer and the (signed) manifest: how every bundle ends."""
    graph_path = out / GRAPH_FILE
    if quantization != "none":
        quantize.quantize_file(graph_path, graph_path, quantization)
    task, config = contents.task, getattr(contents.model, "config", None)
    result = BundleManifest(
        pollinate_version=manifest.pollinate_version(),
        task=Task.CLASSIFICATION if task == "classification" else Task.GENERATION, base=contents.base,
        graph=_graph_message(graph_path, config, task, quantization, contents.lora_inputs, contents.reserved),
        adapter_mode=contents.mode, adapter=contents.adapter,
        tokenizer=_save_tokenizer(contents.tokenizer, contents.model, task, out, contents.reserved),
        producer=_producer())
    if task == "classification":
        result.labels.extend(contents.labels)
    else:
        result.generation.max_new_tokens, result.generation.top_p = DEFAULT_MAX_NEW_TOKENS, 1.0
    manifest.write_bundle_manifest(out, result, key)
    return result
