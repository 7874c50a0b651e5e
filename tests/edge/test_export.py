"""Export of a tiny causal LM: ONNX fp32 against the peft model, KV cache, adapters merged and separate."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from edge_helpers import load_reference, make_run, random_delta

from pollinate.data import encode_prompt
from pollinate.edge import manifest as mf
from pollinate.edge.adapters import export_adapter
from pollinate.edge.bundle_pb2 import AdapterMode, Quantization, Task
from pollinate.edge.quantize import quantize_file
from pollinate.edge.runtime import EdgeModel
from pollinate.models import load_tokenizer
from pollinate.training import greedy_generate

TOLERANCE = 1e-4


def _left_padded(lengths: list[int], vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A left-padded batch of random ids (B, max(lengths)) and its mask."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), 258, dtype=np.int64)  # tiny-llama's pad id
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(0, vocab, n)
        mask[row, width - n:] = 1
    return ids, mask


def _torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference forward, with positions from the mask as generate() computes them."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions)
    return out.logits.numpy()


@pytest.fixture(scope="module")
def reference(gen_run: Path) -> torch.nn.Module:
    return load_reference(gen_run / "checkpoints" / "round-0001")


@pytest.mark.parametrize("lengths", [[1], [7], [33], [5, 12, 20]], ids=["1", "7", "33", "padded-5-12-20"])
def test_merged_logits_match_peft(merged_bundle: Path, reference: torch.nn.Module,
                                  lengths: list[int]) -> None:
    model = EdgeModel(merged_bundle)
    ids, mask = _left_padded(lengths, vocab=256)
    got, want = model.logits(ids, mask), _torch_logits(reference, ids, mask)
    real = mask.astype(bool)  # padded positions predict nothing
    assert np.abs(got[real] - want[real]).max() < TOLERANCE


def test_kv_cache_decoding_matches_a_full_forward(merged_bundle: Path) -> None:
    """Prefill 9 tokens, then feed 3 more one at a time: the same logits as one pass over 12."""
    model = EdgeModel(merged_bundle)
    ids, mask = _left_padded([9, 12], vocab=256, seed=3)
    full = model.logits(ids, mask)
    logits, past = model.forward(ids[:, :9], mask[:, :9])
    steps = [logits[:, -1]]
    for t in range(9, 12):
        logits, past = model.forward(ids[:, t:t + 1], mask[:, :t + 1], past)
        steps.append(logits[:, -1])
    assert past[0].shape[2] == 12
    assert np.abs(np.stack(steps[:-1], 1) - full[:, 8:11]).max() < TOLERANCE


def test_greedy_tokens_equal_pytorch_for_16_tokens(merged_bundle: Path,
                                                   reference: torch.nn.Module) -> None:
    model = EdgeModel(merged_bundle)
    for prompt in ("hello", "What is the capital of France?"):
        ids = encode_prompt(load_tokenizer("tiny-llama"), prompt)
        assert model.encode_prompt(prompt) == ids  # the runner renders the chat template the same way
        want = greedy_generate(reference, ids, max_new_tokens=16, eos_id=None)
        assert model.generate_ids(ids, max_new_tokens=16) == want


def test_separate_adapter_equals_merged_graph(merged_bundle: Path, separate_bundle: Path) -> None:
    ids, mask = _left_padded([4, 15], vocab=256, seed=1)
    merged, separate = EdgeModel(merged_bundle), EdgeModel(separate_bundle)
    assert separate.manifest.adapter_mode == AdapterMode.SEPARATE
    assert np.abs(merged.logits(ids, mask) - separate.logits(ids, mask))[mask.astype(bool)].max() < TOLERANCE


def test_switching_adapters_changes_output_and_back_restores_it(
        gen_run: Path, separate_bundle: Path, round2_adapter: Path) -> None:
    model = EdgeModel(separate_bundle)
    ids, mask = _left_padded([6, 10], vocab=256, seed=2)
    first = model.logits(ids, mask)
    adapter = model.load_adapter(round2_adapter)
    assert adapter.rank == 6 and adapter.round == 2
    second = model.logits(ids, mask)
    assert np.abs(second - first).max() > 1e-2
    # round 2 has another rank, alpha and a per-module rank: still the peft model's output
    want = _torch_logits(load_reference(gen_run / "checkpoints" / "round-0002"), ids, mask)
    assert np.abs(second - want)[mask.astype(bool)].max() < TOLERANCE
    model.use_bundle_adapter()
    assert np.array_equal(model.logits(ids, mask), first)
    model.clear_adapter()  # the bare graph is the base model: LoRA inputs default to zero
    reference = load_reference(gen_run / "checkpoints" / "round-0001")
    with reference.disable_adapter():
        base = _torch_logits(reference, ids, mask)
    assert np.abs(model.logits(ids, mask) - base)[mask.astype(bool)].max() < TOLERANCE


def test_an_adapter_passed_at_start_is_active(separate_bundle: Path, round2_adapter: Path) -> None:
    ids, mask = _left_padded([5], vocab=256, seed=4)
    started = EdgeModel(separate_bundle, adapter=round2_adapter).logits(ids, mask)
    swapped = EdgeModel(separate_bundle)
    swapped.load_adapter(round2_adapter)
    assert np.array_equal(started, swapped.logits(ids, mask))


def test_manifest_describes_the_bundle(separate_bundle: Path) -> None:
    manifest, verified = mf.read_bundle_manifest(separate_bundle)
    assert manifest.task == Task.GENERATION and manifest.graph.quantization == Quantization.NONE
    assert manifest.base.name == "tiny-llama" and len(manifest.base.weights_sha256) == 64
    assert len(manifest.base.base_delta_sha256) == 64  # the run merged updates into its base
    assert manifest.adapter.rank == 4 and manifest.adapter.alpha == 8.0
    assert list(manifest.adapter.targets) == ["q_proj", "v_proj"]
    assert manifest.adapter.base_weights_sha256 == manifest.base.weights_sha256
    assert manifest.graph.opset >= 18 and manifest.graph.num_layers == 2
    assert {f.name for f in manifest.files} == {
        "model.onnx", "tokenizer.json", "chat_template.jinja", "adapters/round-0001.onnx_adapter"}
    lora = {i.name: list(i.shape) for i in manifest.graph.lora_inputs}
    assert lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == [-1, 64]
    assert not verified.signed


def _quantized_copy(bundle: Path, out: Path, mode: str) -> Path:
    """The bundle with its graph quantised in place and its manifest rewritten."""
    shutil.copytree(bundle, out)
    quantize_file(out / "model.onnx", out / "model.onnx", mode)
    manifest, _ = mf.read_bundle_manifest(out, check_files=False)
    manifest.graph.quantization = Quantization.INT8 if mode == "int8" else Quantization.INT4
    mf.write_bundle_manifest(out, manifest)
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_graphs_run_with_adapters(tmp_path: Path, separate_bundle: Path, round2_adapter: Path,
                                            mode: str) -> None:
    """Random weights make agreement meaningless here; the graphs must run, stay close and take adapters."""
    quantized = _quantized_copy(separate_bundle, tmp_path / mode, mode)
    assert (quantized / "model.onnx").stat().st_size < (separate_bundle / "model.onnx").stat().st_size
    ids, mask = _left_padded([3, 8], vocab=256, seed=5)
    fp32, small = EdgeModel(separate_bundle), EdgeModel(quantized)
    assert np.abs(small.logits(ids, mask) - fp32.logits(ids, mask)).max() < 0.5
    before = small.logits(ids, mask)
    small.load_adapter(round2_adapter)  # LoRA branches stay fp32 inputs: the same adapter file fits
    assert np.abs(small.logits(ids, mask) - before).max() > 1e-2
    assert len(small.generate_ids([1, 2, 3], max_new_tokens=4)) == 4


def test_export_adapter_refuses_a_checkpoint_of_another_base(tmp_path: Path, separate_bundle: Path) -> None:
    other = make_run(tmp_path / "run", seed=7)
    with pytest.raises(ValueError, match="trained on base tiny-llama \\(seed 7\\)"):
        export_adapter(other, separate_bundle, tmp_path / "x")


def test_export_adapter_refuses_a_base_with_other_merged_updates(tmp_path: Path, gen_run: Path,
                                                                separate_bundle: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(gen_run, run)
    make_run(run, round_=3, base_delta=random_delta(1))  # round 3 merged more into the base
    with pytest.raises(ValueError, match="other merged updates"):
        export_adapter(run / "checkpoints" / "round-0003", separate_bundle, tmp_path / "x")


def test_export_adapter_refuses_targets_the_graph_lacks(tmp_path: Path, separate_bundle: Path) -> None:
    other = make_run(tmp_path / "run", targets=["q_proj", "o_proj"], base_delta=random_delta(0))
    with pytest.raises(ValueError, match="o_proj.lora_A.weight is not an adapter input"):
        export_adapter(other, separate_bundle, tmp_path / "x")


def test_export_adapter_refuses_a_merged_bundle(tmp_path: Path, gen_run: Path, merged_bundle: Path) -> None:
    with pytest.raises(ValueError, match="has its adapter merged"):
        export_adapter(gen_run, merged_bundle, tmp_path / "x")


def test_export_refuses_bad_choices_and_a_used_out_folder(tmp_path: Path, gen_run: Path) -> None:
    from pollinate.edge.export import export_bundle

    with pytest.raises(ValueError, match="--quantize: 'int3' is not allowed; allowed: none, int8, int4"):
        export_bundle(gen_run, tmp_path / "b", quantization="int3")
    with pytest.raises(ValueError, match="--adapters: 'both' is not allowed; allowed: merged, separate"):
        export_bundle(gen_run, tmp_path / "b", adapter_mode="both")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        export_bundle(gen_run, tmp_path / "used")
    with pytest.raises(ValueError, match="neither a run folder"):
        export_bundle(tmp_path, tmp_path / "b")
