"""Slow: the real SmolLM2-135M-Instruct and MiniLM exported to ONNX, against the peft model in PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from edge_helpers import load_reference, make_run

from pollinate.data import encode_prompt
from pollinate.edge.adapters import export_adapter
from pollinate.edge.runtime import EdgeModel
from pollinate.models import load_tokenizer
from pollinate.training import greedy_generate

SMOLLM2 = "smollm2-135m-instruct"
TOLERANCE = 1e-4
# SmolLM2's logits reach about 25 over 49,152 classes: PyTorch's own fp32 forward is up to 1.0e-4 away
# from its float64 forward on these inputs, onnxruntime's fp32 up to 1.03e-4. 1e-4 is the fp32 floor here.
SMOLLM2_TOLERANCE = 2e-4
PROMPTS = ["Hi", "What is the capital of France?",
           "Write one sentence about bees, flowers and the way pollen travels between them in spring."]


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Round 1 and round 2 checkpoints of small random adapters; merged and separate bundles of round 1."""
    from pollinate.edge.export import export_bundle

    root = tmp_path_factory.mktemp("smollm2")
    run = root / "run"
    make_run(run, model=SMOLLM2, round_=2, rank=8, alpha=16.0, adapter_seed=2, std=0.03,
             targets=["q_proj", "v_proj"])
    make_run(run, model=SMOLLM2, round_=1, rank=4, alpha=8.0, adapter_seed=1, std=0.03,
             targets=["q_proj", "v_proj"])
    export_bundle(run, root / "merged", adapter_mode="merged")
    export_bundle(run, root / "separate", adapter_mode="separate")
    adapter = export_adapter(run / "checkpoints" / "round-0002", root / "separate", root / "round-0002")
    return {"run": run, "merged": root / "merged", "separate": root / "separate", "round2": adapter}


def _batch(lengths: list[int], pad: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, ids.shape[1] - n:] = rng.integers(0, 49152, n)
        mask[row, ids.shape[1] - n:] = 1
    return ids, mask


def _torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The peft model's logits computed in float64: PyTorch's own fp32 logits of SmolLM2 are about
    1e-4 away from these (fp32 rounding over 30 layers, logits near 20), onnxruntime's fp32 closer."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        out = model.double()(input_ids=ids_t, attention_mask=mask_t,
                             position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0))
    model.float()
    return out.logits.float().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [[3], [40], [17, 64]], ids=["3", "40", "padded-17-64"])
def test_smollm2_logits_match_peft(smol: dict[str, Path], lengths: list[int]) -> None:
    reference = load_reference(smol["run"] / "checkpoints" / "round-0001", model=SMOLLM2)
    ids, mask = _batch(lengths, pad=2, seed=len(lengths))
    want = _torch_logits(reference, ids, mask)
    real = mask.astype(bool)
    for bundle in ("merged", "separate"):
        got = EdgeModel(smol[bundle], threads=2).logits(ids, mask)
        assert np.abs(got[real] - want[real]).max() < SMOLLM2_TOLERANCE, bundle


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_pytorch(smol: dict[str, Path]) -> None:
    reference = load_reference(smol["run"] / "checkpoints" / "round-0001", model=SMOLLM2)
    model = EdgeModel(smol["merged"], threads=2)
    for prompt in PROMPTS:
        ids = encode_prompt(load_tokenizer(SMOLLM2), prompt)
        assert model.encode_prompt(prompt) == ids
        want = greedy_generate(reference, ids, max_new_tokens=16, eos_id=None)
        assert model.generate_ids(ids, max_new_tokens=16) == want


@pytest.mark.slow
def test_smollm2_adapter_swap_and_back(smol: dict[str, Path]) -> None:
    model = EdgeModel(smol["separate"], threads=2)
    ids, mask = _batch([12, 30], pad=2, seed=7)
    first = model.logits(ids, mask)
    model.load_adapter(smol["round2"])
    second = model.logits(ids, mask)
    want = _torch_logits(load_reference(smol["run"] / "checkpoints" / "round-0002", model=SMOLLM2), ids, mask)
    real = mask.astype(bool)
    assert np.abs(second - first)[real].max() > 1e-2
    assert np.abs(second[real] - want[real]).max() < SMOLLM2_TOLERANCE
    model.use_bundle_adapter()
    assert np.array_equal(model.logits(ids, mask), first)


@pytest.mark.slow
def test_minilm_classifier_matches_peft(tmp_path: Path) -> None:
    from pollinate.edge.export import export_bundle

    run = tmp_path / "run"
    make_run(run, model="minilm-l6", task="classification", num_labels=2, std=0.03,
             targets=["query", "value"], dataset="rotten-tomatoes")
    for mode in ("merged", "separate"):
        export_bundle(run, tmp_path / mode, adapter_mode=mode)
    reference = load_reference(run / "checkpoints" / "round-0001", model="minilm-l6", task="classification",
                               num_labels=2)
    texts = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés from start "
             "to finish, and the script assumes that not only would subtlety be lost on the target audience, "
             "but that it's also too stupid to realize that they've already seen this exact same movie."]
    batch = load_tokenizer("minilm-l6")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = reference(**batch).logits.numpy()
    for mode in ("merged", "separate"):
        model = EdgeModel(tmp_path / mode, threads=2)
        got = model.logits(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
        assert np.abs(got - want).max() < TOLERANCE, mode
        assert model.labels == ["negative", "positive"]
        label, _ = model.classify(texts[0])
        assert label == model.labels[int(np.argmax(want[0]))]
