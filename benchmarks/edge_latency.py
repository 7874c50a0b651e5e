"""Latency of one backend, in its own process: time to first token and tokens/s, batch 1.

The prompt is exactly 64 tokens; 32 new tokens are generated greedily with a KV cache and no early
stop (end-of-sequence is ignored), so every backend does the same work.

``torch``: PyTorch eager, the checkpoint's adapter merged into the base (its fastest form), a plain
greedy loop over ``model(..., past_key_values=cache)``. ``ort``: an edge bundle with
:class:`pollinate.edge.EdgeModel` (onnxruntime, KV cache in and out of the graph).

    python benchmarks/edge_latency.py --backend torch --run RUN_DIR --tokenizer BUNDLE/tokenizer.json
    python benchmarks/edge_latency.py --backend ort --bundle BUNDLE
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from edge_common import NEW_TOKENS, busy_since, cpu_times, emit, prompt_ids

Generate = Callable[[list[int]], tuple[float, float, list[int]]]


def torch_generator(run: Path, threads: int) -> Generate:
    """Greedy generation in PyTorch eager with a KV cache; returns (ttft, total seconds, tokens)."""
    import torch
    from peft import PeftModel
    from transformers.cache_utils import DynamicCache

    from pollinate.edge.adapters import resolve_checkpoint
    from pollinate.edge.export import apply_base_delta
    from pollinate.models import load_model

    torch.set_num_threads(threads)
    checkpoint = resolve_checkpoint(run)
    cfg = checkpoint.run_config
    base, _ = load_model(cfg["model"], cfg["task"], seed=int(cfg.get("seed", 0)))
    apply_base_delta(base, checkpoint.base_delta)  # what flora / fedex merged into the base
    model = PeftModel.from_pretrained(base, str(checkpoint.folder)).merge_and_unload().eval()

    @torch.inference_mode()
    def generate(ids: list[int]) -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        cache = DynamicCache()
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        ttft = time.perf_counter() - start
        while len(tokens) < NEW_TOKENS:
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                        use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        return ttft, time.perf_counter() - start, tokens

    return generate


def ort_generator(bundle: Path, threads: int) -> Generate:
    """Greedy generation with the edge runner; returns (ttft, total seconds, tokens)."""
    from pollinate.edge.runtime import EdgeModel

    model = EdgeModel(bundle, threads=threads)
    model.eos_ids = frozenset()  # always NEW_TOKENS tokens: the same work as the other backends

    def generate(ids: list[int]) -> tuple[float, float, list[int]]:
        stamps: list[float] = []
        start = time.perf_counter()
        tokens = model.generate_ids(ids, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                    on_token=lambda _: stamps.append(time.perf_counter()))
        return stamps[0] - start, time.perf_counter() - start, tokens

    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch", "ort"], required=True)
    parser.add_argument("--bundle", type=Path, help="the bundle (ort), or whose tokenizer.json to use")
    parser.add_argument("--run", type=Path, help="the run folder (torch)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assert args.bundle is not None
    ids = prompt_ids(args.bundle / "tokenizer.json")
    if args.backend == "torch":
        generate = torch_generator(args.run, args.threads)
    else:
        generate = ort_generator(args.bundle, args.threads)
    generate(ids)  # warm-up: first-run allocations and lazy initialisation
    start = cpu_times()
    runs = [generate(ids) for _ in range(args.repeats)]
    busy = busy_since(start)  # about `threads` when nothing else ran
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    decode = statistics.median((r[1] - r[0]) / (NEW_TOKENS - 1) for r in runs)
    emit({"backend": args.backend, "bundle": str(args.bundle), "threads": args.threads,
          "repeats": args.repeats, "busy_cores": busy, "ttft_s": ttft, "total_s": total,
          "tokens_per_s": NEW_TOKENS / total, "decode_tokens_per_s": 1.0 / decode,
          "tokens": runs[-1][2]})


if __name__ == "__main__":
    main()
