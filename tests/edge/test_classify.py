"""Export of a tiny sequence classifier: logits against the peft model, labels from the run's dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from edge_helpers import load_reference

from pollinate.edge.bundle_pb2 import Task
from pollinate.edge.runtime import EdgeModel
from pollinate.models import load_tokenizer

TOLERANCE = 1e-4
TEXTS = ["short", "a somewhat longer text to classify, with punctuation!", "x" * 90]


def test_classifier_logits_match_peft(cls_run: Path, cls_bundle: Path) -> None:
    model = EdgeModel(cls_bundle)
    assert model.manifest.task == Task.CLASSIFICATION
    reference = load_reference(cls_run / "checkpoints" / "round-0001", model="tiny-bert",
                               task="classification")
    tokenizer = load_tokenizer("tiny-bert")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")  # right-padded batch of 3 lengths
    with torch.no_grad():
        want = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    got = model.logits(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    assert np.abs(got - want).max() < TOLERANCE
    for text, row in zip(TEXTS, want, strict=True):  # the runner's own tokenisation agrees
        label, probs = model.classify(text)
        assert label == model.labels[int(np.argmax(row))]
        expected = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert np.allclose([probs[n] for n in model.labels], expected, atol=1e-5)


def test_labels_come_from_the_run_dataset(cls_bundle: Path) -> None:
    assert EdgeModel(cls_bundle).labels == ["angry", "happy", "sad"]  # ClassLabel order: sorted
