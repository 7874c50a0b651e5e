"""Tests of pollinate.models: offline loading, seeded determinism, input validation, conversion."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from pollinate import models
from pollinate.models import (
    BUILTIN_MODELS,
    cache_dir,
    describe,
    load_model,
    load_tokenizer,
    model_tasks,
)

REPO = Path(__file__).resolve().parents[1]

# Prints "HASH <sha256 of the state dict>" for each (name, task, num_labels, seed) in argv;
# run in a fresh interpreter to compare weights across processes.
HASH_SCRIPT = """
import hashlib, sys
from pollinate.models import load_model
args = sys.argv[1:]
for i in range(0, len(args), 4):
    name, task, num_labels, seed = args[i : i + 4]
    model, _ = load_model(name, task, num_labels=int(num_labels), seed=int(seed))
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    print("HASH", digest.hexdigest())
"""


def state_hash(model: PreTrainedModel) -> str:
    """sha256 over the sorted state dict: names and raw fp32 bytes (same recipe as HASH_SCRIPT)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def subprocess_env(cache: Path | None = None) -> dict[str, str]:
    """Environment for a child interpreter: offline, importing this checkout, optional cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    if cache is not None:
        env["POLLINATE_CACHE"] = str(cache)
    return env


def hashes_in_subprocess(specs: list[tuple[str, str, int, int]]) -> list[str]:
    """State-dict hashes of ``load_model(*spec)`` for each spec, in one fresh interpreter."""
    args = [sys.executable, "-c", HASH_SCRIPT, *(str(x) for spec in specs for x in spec)]
    done = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.split()[1] for line in done.stdout.splitlines() if line.startswith("HASH ")]


def write_config(folder: Path, config: dict[str, object]) -> Path:
    """Create ``folder/config.json`` holding ``config``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


TINY = [("tiny-llama", "generation"), ("tiny-bert", "classification")]


# ---------------------------------------------------------------------------- names, tasks, cache


def test_builtin_models() -> None:
    assert BUILTIN_MODELS == ("smollm2-135m-instruct", "minilm-l6", "tiny-llama", "tiny-bert")


def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b"
    assert cache_dir().is_dir()


def test_cache_dir_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLLINATE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "pollinate"
    assert cache_dir().is_dir()


@pytest.mark.parametrize(
    ("name", "tasks"),
    [
        ("smollm2-135m-instruct", ("generation",)),
        ("tiny-llama", ("generation",)),
        ("minilm-l6", ("classification",)),
        ("tiny-bert", ("classification",)),
    ],
)
def test_model_tasks_builtin(name: str, tasks: tuple[str, ...]) -> None:
    assert model_tasks(name) == tasks


@pytest.mark.parametrize(
    ("config", "tasks"),
    [
        ({"model_type": "qwen2"}, ("generation",)),
        ({"model_type": "gpt2"}, ("generation",)),
        ({"model_type": "roberta"}, ("classification",)),
        ({"model_type": "distilbert"}, ("classification",)),
        ({"model_type": "newthing", "architectures": ["NewThingForCausalLM"]}, ("generation",)),
        ({"model_type": "newthing", "is_decoder": True}, ("generation",)),
        ({"model_type": "newthing"}, ("generation", "classification")),
    ],
)
def test_model_tasks_local_folder(
    tmp_path: Path, config: dict[str, object], tasks: tuple[str, ...]
) -> None:
    assert model_tasks(str(write_config(tmp_path / "m", config))) == tasks


# ---------------------------------------------------------------------------- bad input


def test_unknown_name_is_rejected(tmp_path: Path) -> None:
    expected = (
        "model: 'foo' is not a built-in model or a folder with config.json; "
        "built-ins: smollm2-135m-instruct, minilm-l6, tiny-llama, tiny-bert"
    )
    for call in (model_tasks, load_tokenizer, describe):
        with pytest.raises(ValueError) as info:
            call("foo")
        assert str(info.value) == expected
    with pytest.raises(ValueError, match="^model: 'foo'"):
        load_model("foo", "generation")
    with pytest.raises(ValueError, match="^model: .*config.json"):
        load_model(str(tmp_path), "generation")  # a folder, but no config.json


def test_unsupported_task_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^task: 'classification' .*'tiny-llama'.*generation$"):
        load_model("tiny-llama", "classification")
    with pytest.raises(ValueError, match=r"^task: 'generation' .*'minilm-l6'.*classification$"):
        load_model("minilm-l6", "generation")


def test_unknown_task_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^task: 'translate' .*generation, classification$"):
        load_model("tiny-llama", "translate")


@pytest.mark.parametrize(("key", "value"), [("num_labels", 0), ("seed", -1), ("seed", 1.5)])
def test_bad_numbers_are_rejected(key: str, value: object) -> None:
    kwargs: dict[str, object] = {key: value}
    with pytest.raises(ValueError, match=f"^{key}: "):
        load_model("tiny-bert", "classification", **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize(("name", "task"), TINY)
def test_tiny_model_forward(name: str, task: str) -> None:
    start = time.perf_counter()
    model, tokenizer = load_model(name, task, num_labels=3)
    assert time.perf_counter() - start < 1.0  # built from config, no files
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    batch = tokenizer(["hello world", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    if task == "generation":
        assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    else:
        assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "task"), TINY)
def test_tiny_model_is_seeded(name: str, task: str) -> None:
    first, _ = load_model(name, task, seed=7)
    torch.manual_seed(12345)  # the global RNG must not matter
    second, _ = load_model(name, task, seed=7)
    other, _ = load_model(name, task, seed=8)
    assert state_hash(first) == state_hash(second)
    assert state_hash(first) != state_hash(other)


def test_models_are_identical_across_processes() -> None:
    specs = [
        ("tiny-llama", "generation", 2, 3),
        ("tiny-bert", "classification", 3, 3),
        ("minilm-l6", "classification", 2, 4),
    ]
    here = [state_hash(load_model(*spec)[0]) for spec in specs]
    assert hashes_in_subprocess(specs) == here


def test_tiny_llama_ties_embeddings() -> None:
    model, _ = load_model("tiny-llama", "generation")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_load_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    load_model("tiny-bert", "classification", seed=5)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------- tokenizers


def test_tiny_llama_tokenizer() -> None:
    tokenizer = load_tokenizer("tiny-llama")
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) < 300
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text  # byte-level: lossless round trip


def test_tiny_bert_tokenizer() -> None:
    tokenizer = load_tokenizer("tiny-bert")
    assert tokenizer.pad_token is not None
    ids = tokenizer("héllo")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "héllo"


def test_tokenizers_are_cached() -> None:
    assert load_tokenizer("tiny-llama") is load_tokenizer("tiny-llama")
    assert load_tokenizer("tiny-llama") is load_model("tiny-llama", "generation")[1]


# ---------------------------------------------------------------------------- MiniLM


def test_minilm_head_is_seeded() -> None:
    first, tokenizer = load_model("minilm-l6", "classification", num_labels=4, seed=11)
    torch.manual_seed(54321)
    second, _ = load_model("minilm-l6", "classification", num_labels=4, seed=11)
    other, _ = load_model("minilm-l6", "classification", num_labels=4, seed=12)
    head = "classifier.weight"
    assert first.state_dict()[head].shape == (4, 384)
    assert state_hash(first) == state_hash(second)
    assert not torch.equal(first.state_dict()[head], other.state_dict()[head])
    body = "bert.encoder.layer.0.output.dense.weight"  # pretrained: the seed must not touch it
    assert torch.equal(first.state_dict()[body], other.state_dict()[body])
    assert torch.count_nonzero(first.state_dict()["classifier.bias"]) == 0
    assert tokenizer.pad_token == "[PAD]"
    assert not first.training


# ---------------------------------------------------------------------------- local folders


def test_local_folder_loads(tmp_path: Path) -> None:
    model, tokenizer = load_model("tiny-llama", "generation", seed=1)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, loaded_tokenizer = load_model(str(folder), "generation")
    assert state_hash(loaded) == state_hash(model)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.pad_token == "<pad>"
    assert describe(str(folder)) == f"{folder} (Llama, 90.6K parameters)"


def test_local_folder_gets_chat_template_and_pad(tmp_path: Path) -> None:
    model, tokenizer = load_model("tiny-llama", "generation")
    folder = tmp_path / "bare"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    bare = load_tokenizer(str(folder))
    assert bare.pad_token == "<|im_end|>"  # falls back to eos
    assert bare.chat_template


def test_local_folder_without_tokenizer_is_rejected(tmp_path: Path) -> None:
    model, _ = load_model("tiny-bert", "classification")
    model.save_pretrained(tmp_path / "no-tok")
    with pytest.raises(ValueError, match="^model: .*tokenizer"):
        load_model(str(tmp_path / "no-tok"), "classification")


# ---------------------------------------------------------------------------- describe


def test_describe() -> None:
    assert describe("minilm-l6") == "minilm-l6 (Bert, 22.7M parameters)"
    assert describe("tiny-llama").startswith("tiny-llama (Llama, ")
    assert describe("tiny-bert").startswith("tiny-bert (Bert, ")


# ---------------------------------------------------------------------------- conversion machinery


def fake_convert(target: Path) -> None:
    """Stand-in for the GGUF conversion: writes the two files that mark a complete folder."""
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"weights")


def test_conversion_replaces_stale_and_partial_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path))
    stale = tmp_path / "models" / ".smollm2-135m-instruct.tmp-dead"
    partial = tmp_path / "models" / "smollm2-135m-instruct"
    stale.mkdir(parents=True)
    write_config(partial, {})  # config.json but no weights: never to be used
    monkeypatch.setattr(models, "_convert_smollm2", fake_convert)
    folder = models._smollm2_folder()
    assert folder == partial
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        ".smollm2-135m-instruct.lock",
        "smollm2-135m-instruct",
    ]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(target: Path) -> None:
        (target / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_convert_smollm2", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models._smollm2_folder()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m-instruct.lock"]


# ---------------------------------------------------------------------------- SmolLM2 (slow)


def greedy_answer(model: PreTrainedModel, tokenizer: object, question: str) -> str:
    """Greedy reply of a chat model to one user message."""
    batch = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)  # type: ignore[operator]
    reply: str = tokenizer.decode(  # type: ignore[attr-defined]
        out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return reply


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path))
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m-instruct", "generation")
    print(f"first load with conversion: {time.perf_counter() - start:.1f} s")
    assert torch.equal(torch.rand(3), expected)  # the conversion leaves the global RNG alone
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert "Paris" in greedy_answer(model, tokenizer, "What is the capital of France?")

    def must_not_convert(target: Path) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_smollm2", must_not_convert)
    inode = (folder / "model.safetensors").stat().st_ino
    start = time.perf_counter()
    again, _ = load_model("smollm2-135m-instruct", "generation")
    assert time.perf_counter() - start < 10.0  # measured about 0.3 s; the conversion takes ~20 s
    assert (folder / "model.safetensors").stat().st_ino == inode
    assert state_hash(again) == state_hash(model)
    assert describe("smollm2-135m-instruct") == "smollm2-135m-instruct (Llama, 134.5M parameters)"


@pytest.mark.slow
def test_smollm2_concurrent_conversions(tmp_path: Path) -> None:
    args = [sys.executable, "-c", HASH_SCRIPT, "smollm2-135m-instruct", "generation", "2", "0"]
    # both children start against an empty cache: one converts, the other waits on the lock
    env = subprocess_env(tmp_path)
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    hashes = {out.split("HASH ")[-1].strip() for out, _ in outputs}
    assert len(hashes) == 1
    # transformers' GGUF progress bar: only the lock holder dequantised, the other reused its folder
    assert sum("de-quantizing" in err for _, err in outputs) == 1
    entries = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert entries == [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"]
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
