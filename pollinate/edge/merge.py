"""A checkpoint as a plain Hugging Face model folder: ``pollinate merge RUN_DIR_OR_CHECKPOINT --out DIR``.

The folder holds the run's base model with everything the federation trained folded into its weights:
first the updates a strategy merged into the base during the run (FLoRA's and FedEx-LoRA's low-rank
deltas, FedKSeed's w − w0 in ``full`` mode: the file the checkpoint's export view names), then the
checkpoint's peft LoRA view (LoRA-SB's with R folded into A), then a trained classification head. It is
built exactly as ``pollinate export --adapters merged`` builds its graph
(:func:`pollinate.edge.export.load_checkpoint`, then peft's ``merge_and_unload``), and saved with
``save_pretrained``: ``config.json``, ``model.safetensors``, ``generation_config.json`` when the model
generates, the tokenizer's files, and :data:`MERGE_FILE`, which says where it came from. It loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` (``AutoModelForSequenceClassification`` for a classifier,
with the run's label names in ``config.id2label``), without peft or pollinate.

A method whose export view is ``unsupported``, or ``merge_unsupported`` (SFPrompt: a soft prompt prepended
to every input, which no plain model folder holds; its edge bundle's graph prepends it), is refused in
one line.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pollinate.edge import adapters, manifest
from pollinate.edge.export import class_count, load_checkpoint, prepare_out, run_labels
from pollinate.files import MANIFEST_FILE

__all__ = ["MERGE_FILE", "merge_checkpoint"]

MERGE_FILE = "pollinate-merge.json"
"""The provenance of a merged folder: run, round, method, strategy and the SHA-256 of what was merged."""
_AUTO_CLASS = {"generation": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification"}
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def merge_checkpoint(source: Path, out: Path) -> dict[str, Any]:
    """Write a checkpoint (or a run folder's latest) as a plain Hugging Face model folder.

    Parameters
    ----------
    source : Path
        A run folder (its ``LATEST`` checkpoint is used) or a checkpoint folder inside a run folder.
    out : Path
        The folder to create; it must not exist or be empty.

    Returns
    -------
    dict
        What ``out/pollinate-merge.json`` holds.

    Raises
    ------
    ValueError
        On a source that is not a checkpoint, a method that cannot be merged, a checkpoint file that no
        longer matches its manifest's SHA-256, or an ``out`` that exists and is not an empty folder.
    """
    action = "merged into a plain Hugging Face model"
    checkpoint = adapters.resolve_checkpoint(source, action=action)
    if checkpoint.merge_unsupported is not None:
        raise adapters.refusal(checkpoint.folder, action, checkpoint.method, checkpoint.merge_unsupported)
    written = json.loads((checkpoint.folder / MANIFEST_FILE).read_text())
    digests = _verified_digests(checkpoint, written)
    peft_adapter = adapters.read_adapter(checkpoint.folder)
    prepare_out(out)
    try:
        return _write(checkpoint, peft_adapter, written, digests, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written model behind
        raise


def _verified_digests(checkpoint: adapters.Checkpoint, written: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of the manifest and of every file merged; ValueError when one differs from the manifest's
    or the base delta it lists is gone."""
    recorded = written.get("files") or {}
    delta = str((written.get("export") or {}).get("base_delta") or "")
    if delta in recorded and checkpoint.base_delta is None:  # merging without it would be silently wrong
        raise ValueError(f"RUN_DIR_OR_CHECKPOINT: {str(checkpoint.folder / delta)!r} is missing; the "
                         f"checkpoint's {MANIFEST_FILE} lists it (the updates merged into the base)")
    names = [*_ADAPTER_FILES, *([checkpoint.base_delta.name] if checkpoint.base_delta else [])]
    digests = {MANIFEST_FILE: manifest.sha256_file(checkpoint.folder / MANIFEST_FILE)}
    for name in names:
        digests[name] = manifest.sha256_file(checkpoint.folder / name)
        if name in recorded and recorded[name] != digests[name]:
            raise ValueError(f"RUN_DIR_OR_CHECKPOINT: {str(checkpoint.folder / name)!r} does not match its "
                             f"SHA-256 in {MANIFEST_FILE}: the checkpoint changed after it was written")
    return digests


def _write(checkpoint: adapters.Checkpoint, peft_adapter: adapters.PeftAdapter, written: dict[str, Any],
           digests: dict[str, str], out: Path) -> dict[str, Any]:
    """Merge, then save the model, the tokenizer and :data:`MERGE_FILE` into ``out``."""
    task = str(checkpoint.run_config["task"])
    peft_model, tokenizer = load_checkpoint(checkpoint, peft_adapter)
    model = peft_model.merge_and_unload()  # W + ΔW in every adapted layer; trained heads replace the base's
    labels = None
    if task == "classification":  # the run's dataset's names, when it can be read
        labels = run_labels(checkpoint.run_config, class_count(peft_adapter))
    if labels is not None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    with _no_progress_bars():
        model.save_pretrained(str(out))  # safetensors: transformers 5 writes no other format
    tokenizer.save_pretrained(str(out))
    info = _provenance(checkpoint, written, digests, labels)
    (out / MERGE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' shard-writing progress bar (the command prints one line of its own)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _provenance(checkpoint: adapters.Checkpoint, written: dict[str, Any], digests: dict[str, str],
                labels: list[str] | None) -> dict[str, Any]:
    """What :data:`MERGE_FILE` holds."""
    cfg = checkpoint.run_config
    info: dict[str, Any] = {
        "pollinate_version": manifest.pollinate_version(),
        "auto_class": _AUTO_CLASS[str(cfg["task"])],
        "run": str(checkpoint.run) if checkpoint.run else None,
        "checkpoint": str(checkpoint.folder),
        "round": checkpoint.round,
        "method": checkpoint.method,
        "strategy": str(written.get("strategy") or cfg.get("strategy") or ""),
        "model": str(cfg["model"]), "task": str(cfg["task"]), "seed": int(cfg.get("seed", 0)),
        "base_delta": checkpoint.base_delta.name if checkpoint.base_delta else None,
        "adapter": checkpoint.adapter,
        "sha256": digests,
    }
    if labels is not None:
        info["labels"] = labels
    return info
