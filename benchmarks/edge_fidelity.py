"""Fidelity of one backend, in its own process: greedy agreement with PyTorch and held-out loss.

``--backend torch`` writes the reference: for every held-out example of the run (the split no client
trained on) its chat prompt, PyTorch's greedy answer (at most 32 tokens, stopping at end-of-sequence)
and the answer-only tokenisation the server evaluates the loss on; plus PyTorch's loss.

``--backend ort`` reads that reference and measures an edge bundle:

- token agreement: feeding the prompt and PyTorch's greedy answer, the share of answer positions where
  the bundle's argmax is PyTorch's token (teacher forcing, so one early difference does not hide the
  rest);
- exact answers: the share of prompts whose free-running greedy answer is identical to PyTorch's;
- eval loss: mean cross-entropy per answer token over the held-out split.

    python benchmarks/edge_fidelity.py --backend torch --run RUN_DIR --out reference.json
    python benchmarks/edge_fidelity.py --backend ort --bundle BUNDLE --reference reference.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from edge_common import NEW_TOKENS, emit

IGNORE = -100


def answer_loss(logits: np.ndarray, labels: list[int]) -> tuple[float, int]:
    """Summed cross-entropy of the labelled tokens of one example (causal shift) and their count."""
    z = logits[:-1].astype(np.float64)  # (S-1, V): position t predicts token t+1
    target = np.asarray(labels[1:])
    keep = target != IGNORE
    z, target = z[keep], target[keep]
    log_norm = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float((log_norm - z[np.arange(len(target)), target]).sum()), int(keep.sum())


def torch_reference(run: Path, out: Path, threads: int) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    from pollinate import workload
    from pollinate.config import RunConfig
    from pollinate.data import encode_dataset, encode_prompt
    from pollinate.edge.adapters import resolve_checkpoint
    from pollinate.edge.export import apply_base_delta
    from pollinate.training import greedy_generate

    torch.set_num_threads(threads)
    checkpoint = resolve_checkpoint(run)
    known = set(RunConfig().to_run_config())
    cfg = RunConfig.from_run_config({k: v for k, v in checkpoint.run_config.items() if k in known})
    base, tokenizer = workload.base_model(cfg)
    apply_base_delta(base, checkpoint.base_delta)  # what flora / fedex merged into the base
    model = PeftModel.from_pretrained(base, str(checkpoint.folder)).merge_and_unload().eval()
    heldout = workload.splits(cfg)[1]
    encoded = encode_dataset(heldout, tokenizer, cfg.task, cfg.max_seq_len)
    examples, loss, count = [], 0.0, 0
    for row, enc in zip(heldout, encoded, strict=True):
        prompt = encode_prompt(tokenizer, row["prompt"])
        answer = greedy_generate(model, prompt, max_new_tokens=NEW_TOKENS, eos_id=tokenizer.eos_token_id)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].numpy()
        part, n = answer_loss(logits, enc["labels"])
        loss, count = loss + part, count + n
        examples.append({"prompt": prompt, "answer": answer, "input_ids": enc["input_ids"],
                         "labels": enc["labels"]})
    out.write_text(json.dumps({"model": cfg.model, "examples": examples}))
    return {"backend": "torch", "examples": len(examples), "eval_loss": loss / count}


def ort_fidelity(bundle: Path, reference: Path, threads: int) -> dict[str, Any]:
    from pollinate.edge.runtime import EdgeModel

    model = EdgeModel(bundle, threads=threads)
    examples = json.loads(reference.read_text())["examples"]
    agree = positions = exact = 0
    loss, count = 0.0, 0
    for ex in examples:
        prompt, answer = ex["prompt"], ex["answer"]
        ids = np.asarray([prompt + answer], dtype=np.int64)
        logits = model.logits(ids, np.ones_like(ids))[0]
        predicted = logits[len(prompt) - 1: len(prompt) - 1 + len(answer)].argmax(-1)
        agree += int((predicted == np.asarray(answer)).sum())
        positions += len(answer)
        exact += int(model.generate_ids(prompt, max_new_tokens=NEW_TOKENS) == answer)
        enc = np.asarray([ex["input_ids"]], dtype=np.int64)
        part, n = answer_loss(model.logits(enc, np.ones_like(enc))[0], ex["labels"])
        loss, count = loss + part, count + n
    return {"backend": "ort", "bundle": str(bundle), "examples": len(examples),
            "token_agreement": agree / positions, "exact_answers": exact / len(examples),
            "eval_loss": loss / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch", "ort"], required=True)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.backend == "torch":
        emit(torch_reference(args.run, args.out, args.threads))
    else:
        emit(ort_fidelity(args.bundle, args.reference, args.threads))


if __name__ == "__main__":
    main()
