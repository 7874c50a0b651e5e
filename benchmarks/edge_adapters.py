"""The adapter path, in its own process: forward time of a bundle, and the time to swap adapter files.

``--mode forward`` times a 64-token prefill and one decoding step after it (batch 1) on a bundle, with
an adapter file active when ``--adapter`` is given: run once on the merged graph and once on the
separate graph with the same round's adapter, each in its own process, for the overhead of keeping
the LoRA branches out of the weights.

``--mode swap`` times replacing the active adapter by another round's file: in full (manifest,
SHA-256, signature when signed, parameter check, then ``onnxruntime.LoraAdapter`` and new run options)
and the onnxruntime part alone.

    python benchmarks/edge_adapters.py --mode forward --bundle BUNDLE [--adapter FILE]
    python benchmarks/edge_adapters.py --mode swap --bundle BUNDLE --adapter A --adapter B
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from common import median_time
from edge_common import emit, prompt_ids


def forward_times(bundle: Path, adapter: Path | None, threads: int, repeats: int) -> dict[str, Any]:
    from pollinate.edge.runtime import EdgeModel

    model = EdgeModel(bundle, threads=threads, adapter=adapter)
    ids = np.asarray([prompt_ids(bundle / "tokenizer.json")], dtype=np.int64)  # (1, 64)
    mask = np.ones_like(ids)
    _, past = model.forward(ids, mask)
    step, step_mask = ids[:, -1:], np.ones((1, ids.shape[1] + 1), dtype=np.int64)
    return {"bundle": str(bundle), "adapter": str(adapter) if adapter else None,
            "prefill_64_s": median_time(lambda: model.forward(ids, mask), repeats),
            "decode_step_s": median_time(lambda: model.forward(step, step_mask, past), repeats * 5)}


def swap_times(bundle: Path, adapters: list[Path], threads: int, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort

    from pollinate.edge.runtime import EdgeModel

    model = EdgeModel(bundle, threads=threads)
    turn = [0]

    def full() -> None:  # verify and activate the next round's file
        model.load_adapter(adapters[turn[0] % len(adapters)])
        turn[0] += 1

    def onnxruntime_only() -> None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapters[turn[0] % len(adapters)]))
        ort.RunOptions().add_active_adapter(lora)
        turn[0] += 1

    return {"bundle": str(bundle), "swap_full_s": median_time(full, repeats),
            "swap_onnxruntime_s": median_time(onnxruntime_only, repeats),
            "adapter_bytes": [p.stat().st_size for p in adapters]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["forward", "swap"], required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, action="append", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.mode == "forward":
        adapter = args.adapter[0] if args.adapter else None
        emit(forward_times(args.bundle, adapter, args.threads, args.repeats))
    else:
        emit(swap_times(args.bundle, args.adapter, args.threads, args.repeats))


if __name__ == "__main__":
    main()
