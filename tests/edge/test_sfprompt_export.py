"""Export of SFPrompt checkpoints: the bundle computes what the run's server model computes.

The server's trainee (``SplitServer``: the base with the trained tail, the soft prompt prepended) is built
on tiny-llama and tiny-bert made four blocks deep (head 1, body 2, tail 1), its prompt and tail moved away
from their start, and committed as the round loop commits a checkpoint. The bundle runs in pollinate's
torch-free runner (``EdgeModel``): its logits equal the prompted model's to 1e-4 (fp32), its greedy
tokens are the same, and the prompt's P positions come off the input's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from edge_helpers import run_without_torch

from pollinate import models
from pollinate.config import RunConfig
from pollinate.edge import manifest as mf
from pollinate.edge.bundle_pb2 import AdapterMode, BundleManifest, Task
from pollinate.edge.export import export_bundle, weights_sha256
from pollinate.edge.runtime import EdgeModel
from pollinate.methods.sfprompt.method import SfPromptMethod, SplitServer
from pollinate.server.rundir import RunDir
from pollinate.training import greedy_generate

TOLERANCE = 1e-4
PROMPT, LAYERS, POSITIONS = 4, 4, 256  # tiny models: 256 positions
MOODS = ["sad", "happy", "angry"]


@dataclasses.dataclass
class Exported:
    """A committed SFPrompt checkpoint, the server model it holds, and its bundle."""

    server: SplitServer
    run: Path
    bundle: Path
    seconds: float
    """How long the export took."""


@pytest.fixture(scope="module")
def deep_tiny() -> Iterator[None]:
    """The tiny models four blocks deep, for the module (two cannot hold a head, a body and a tail)."""
    original = models._tiny_config

    def deeper(name: str, tokenizer: Any, num_labels: int) -> Any:
        config = original(name, tokenizer, num_labels)
        config.num_hidden_layers = LAYERS
        return config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_tiny_config", deeper)
        yield


def _commit(folder: Path, model: str, task: str, dataset: str, *, prompt: int = PROMPT,
            std: float = 0.05) -> tuple[SplitServer, Path]:
    """A run folder whose round-2 checkpoint holds a prompt and a tail ``std`` away from their start."""
    cfg = RunConfig.from_run_config({"model": model, "task": task, "strategy": "sfprompt", "dataset": dataset,
                                     "seed": 3, "eval-examples": 2, "sfprompt.prompt-tokens": prompt})
    server = SplitServer(cfg)
    g = torch.Generator().manual_seed(0)
    server.load({k: v + std * torch.randn(v.shape, generator=g) for k, v in server.upload().items()}, seed=0)
    run = RunDir(folder)
    run.write_json("config.json", cfg.to_run_config())
    view = dataclasses.asdict(SfPromptMethod(cfg).export_view())
    run.commit_checkpoint(2, server.save, {"strategy": "sfprompt", "method": "sfprompt", "export": view})
    return server, folder


def _export(server: SplitServer, run: Path, bundle: Path, **options: Any) -> Exported:
    start = time.perf_counter()
    export_bundle(run, bundle, **options)
    return Exported(server, run, bundle, time.perf_counter() - start)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return mf.generate_keys(tmp_path_factory.mktemp("keys") / "edge")


@pytest.fixture(scope="module")
def llama(deep_tiny: None, tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Exported:
    root = tmp_path_factory.mktemp("sfprompt-llama")
    server, run = _commit(root / "run", "tiny-llama", "generation", "auto")
    return _export(server, run, root / "bundle", sign_key=keys[0])


@pytest.fixture(scope="module")
def bert(deep_tiny: None, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("sfprompt-bert")
    data = root / "moods.jsonl"  # the run's dataset names the three classes
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": m}) + "\n"
                            for i, m in enumerate(MOODS * 2)))
    server, run = _commit(root / "run", "tiny-bert", "classification", str(data))
    return _export(server, run, root / "bundle")


def _prompted_logits(server: SplitServer, ids: list[int], dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The server model's logits of one unpadded row at the input's positions, computed in ``dtype``:
    (T, V) fp32."""
    row = torch.tensor([ids])
    with torch.no_grad():
        logits = server.model.to(dtype)(row, torch.ones_like(row)).logits  # [1, P+T, V], the prompt's first
    server.model.float()
    return logits[0, server.split.prompt_tokens:].float().numpy()


# --------------------------------------------------------------------------------------------------
# Generation: tiny-llama
# --------------------------------------------------------------------------------------------------


def test_generation_logits_equal_the_prompted_model(llama: Exported, keys: tuple[Path, Path]) -> None:
    """A left-padded batch of three lengths: every real position equals the prompted model's on its row
    alone (the graph puts the prompt's keys and values first, the input from position P)."""
    model = EdgeModel(llama.bundle, public_key=keys[1])
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, n).tolist() for n in (1, 9, 14)]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), 258, dtype=np.int64)  # tiny-llama's pad id, on the left
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    got = model.logits(ids, mask)
    diff = max(float(np.abs(got[i, width - len(row):] - _prompted_logits(llama.server, row)).max())
               for i, row in enumerate(rows))
    print(f"\ntiny-llama (4 blocks, P={PROMPT}): export {llama.seconds:.1f} s, max |logit diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_greedy_tokens_equal_the_prompted_model(llama: Exported) -> None:
    """The runner's KV-cache decoding (prefill, then one token a step) picks the prompted model's tokens."""
    model = EdgeModel(llama.bundle)
    for prompt in ("hello", "What is the capital of France?"):
        ids = model.encode_prompt(prompt)
        got = model.generate_ids(ids, max_new_tokens=8)
        want = greedy_generate(llama.server.model, ids, max_new_tokens=8, eos_id=None)
        assert got == want[:len(got)] and (len(got) == 8 or got[-1] in model.eos_ids)


def test_the_runner_generates_and_classifies_without_torch(llama: Exported, bert: Exported,
                                                           keys: tuple[Path, Path]) -> None:
    done = run_without_torch("generate", str(llama.bundle), "hello", "--max-new-tokens", "4",
                             "--public-key", str(keys[1]))
    assert done.returncode == 0, done.stderr
    done = run_without_torch("classify", str(bert.bundle), "some text")
    assert done.returncode == 0 and done.stdout.split()[0] in MOODS, done.stderr


def test_the_prompt_changes_the_output(llama: Exported) -> None:
    """The prompt is in the graph: the same model without it (the trained tail, no prefix) differs."""
    ids = [5, 17, 42, 9]
    row = torch.tensor([ids])
    with torch.no_grad():
        bare = llama.server.model.base(input_ids=row, attention_mask=torch.ones_like(row)).logits[0].numpy()
    got = EdgeModel(llama.bundle).logits(np.asarray([ids]), np.ones((1, 4), dtype=np.int64))[0]
    assert np.abs(got - bare).max() > 1e-2


def test_the_manifest_describes_a_merged_prompted_bundle(llama: Exported, keys: tuple[Path, Path]) -> None:
    bundle, verified = mf.read_bundle_manifest(llama.bundle, mf.load_public_key(keys[1]))
    checkpoint = llama.run / "checkpoints" / "round-0002"
    assert verified.signature_checked and bundle.task == Task.GENERATION
    assert bundle.adapter_mode == AdapterMode.MERGED and not bundle.graph.lora_inputs
    assert {f.name for f in bundle.files} == {"model.onnx", "tokenizer.json", "chat_template.jinja"}
    assert bundle.graph.num_layers == LAYERS
    assert bundle.graph.max_positions == bundle.tokenizer.max_length == POSITIONS - PROMPT
    adapter = bundle.adapter
    assert adapter.source == "round-0002" and adapter.round == 2 and not adapter.file
    assert adapter.source_sha256 == mf.sha256_file(checkpoint / "sfprompt.safetensors")
    assert list(adapter.modules_to_save) == ["prompt", "model.layers.3", "model.norm"]  # lm_head: tied
    base, _ = models.load_model("tiny-llama", "generation", seed=3)  # the frozen base, before the tail
    assert bundle.base.weights_sha256 == adapter.base_weights_sha256 == weights_sha256(base)
    with pytest.raises(ValueError, match="exceeds the model's 252 positions"):
        EdgeModel(llama.bundle).generate_ids([1] * 250, max_new_tokens=3)


# --------------------------------------------------------------------------------------------------
# Classification: tiny-bert
# --------------------------------------------------------------------------------------------------


def test_classifier_logits_equal_the_prompted_model(bert: Exported) -> None:
    """A right-padded batch, as the server evaluates: the graph prepends the prompt before [CLS]."""
    model = EdgeModel(bert.bundle)
    texts = ["short", "a somewhat longer text to classify, with punctuation!", "x" * 90]
    batch = bert.server.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = bert.server.model(batch["input_ids"], batch["attention_mask"]).logits.numpy()
    got = model.logits(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    diff = float(np.abs(got - want).max())
    print(f"\ntiny-bert (4 blocks, P={PROMPT}): export {bert.seconds:.1f} s, max |logit diff| {diff:.2e}")
    assert diff <= TOLERANCE
    assert model.labels == sorted(MOODS)  # the run's dataset's names, ClassLabel order
    for text, row in zip(texts, want, strict=True):
        assert model.classify(text)[0] == model.labels[int(np.argmax(row))]


def test_a_long_text_is_cut_to_the_positions_the_prompt_leaves(bert: Exported) -> None:
    model = EdgeModel(bert.bundle)
    assert model.manifest.tokenizer.max_length == model.manifest.graph.max_positions == POSITIONS - PROMPT
    label, probs = model.classify("word " * 400)  # 400 tokens cut to 252: 256 positions with the prompt
    assert label in MOODS and abs(sum(probs.values()) - 1) < 1e-5


# --------------------------------------------------------------------------------------------------
# What is refused
# --------------------------------------------------------------------------------------------------


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    from pollinate.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_separate_adapters_and_merge_are_refused_in_one_line(
        llama: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "b")
    err = _one_line(capsys, ["export", str(llama.run), "--out", out, "--adapters", "separate"])
    assert "--adapters: 'separate' is not allowed" in err and "(sfprompt) trained a soft prompt" in err
    err = _one_line(capsys, ["merge", str(llama.run), "--out", str(tmp_path / "m")])
    assert "cannot be merged into a plain Hugging Face model: method 'sfprompt'" in err
    assert "no place for the soft prompt" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "m").exists()


def test_adapter_for_refuses_a_prompt_checkpoint(llama: Exported, tmp_path: Path) -> None:
    from pollinate.edge.adapters import export_adapter

    separate = tmp_path / "separate"  # the manifest of a separate-adapter bundle is all it reads first
    separate.mkdir()
    mf.write_bundle_manifest(separate, BundleManifest(adapter_mode=AdapterMode.SEPARATE))
    with pytest.raises(ValueError, match="holds a soft prompt and trained blocks, no adapter"):
        export_adapter(llama.run, separate, tmp_path / "x")


# --------------------------------------------------------------------------------------------------
# Slow: the real SmolLM2 (30 blocks, cut 1 / 28 / 1, P = 8)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_bundle_equals_the_prompted_model(tmp_path: Path) -> None:
    """Against the prompted model in float64: PyTorch's own fp32 SmolLM2 logits are about 1e-4 from it,
    onnxruntime's fp32 as close (tests/edge/test_real_models.py), so 2e-4 is the fp32 floor here."""
    server, run = _commit(tmp_path / "run", "smollm2-135m-instruct", "generation", "auto", prompt=8, std=0.01)
    exported = _export(server, run, tmp_path / "bundle")
    model = EdgeModel(exported.bundle, threads=2)
    ids = model.encode_prompt("What is the capital of France?")
    got = model.logits(np.asarray([ids]), np.ones((1, len(ids)), dtype=np.int64))[0]
    diff = float(np.abs(got - _prompted_logits(server, ids, torch.float64)).max())
    print(f"\nsmollm2 (P=8): export {exported.seconds:.1f} s, max |logit diff| to float64 {diff:.2e}")
    assert diff < 2e-4
    want = greedy_generate(server.model, ids, max_new_tokens=8, eos_id=None)
    got_ids = model.generate_ids(ids, max_new_tokens=8)
    assert got_ids == want[:len(got_ids)] and (len(got_ids) == 8 or got_ids[-1] in model.eos_ids)
