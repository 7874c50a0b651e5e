"""Edge benchmarks: SmolLM2-135M after a short federated fine-tune, exported and run on onnxruntime.

1. A federation: ``pollinate simulate`` with every default (4 clients, 3 rounds of 10 steps, LoRA
   rank 8 on q/k/v/o), unless ``--run-dir`` names a finished run.
2. Bundles of its last checkpoint: fp32, int8 and int4 with the adapter merged, and fp32 with the
   adapter kept separate; the earlier rounds' adapters as files for the separate bundle.
   For comparison, ``int8-dynamic``: the fp32 graph through onnxruntime's plain ``quantize_dynamic``
   (every MatMul and Gather, per-channel weights, one scale per activation tensor).
3. Each measurement in its own process (edge_latency.py, edge_fidelity.py, edge_adapters.py):
   latency against PyTorch eager with KV cache, size, fidelity, and the adapter path.

Writes ``benchmarks/results/edge.json`` and ``docs/benchmarks-edge.md``.

    python benchmarks/edge_bench.py [--run-dir RUN] [--work DIR] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_common import NEW_TOKENS, PROMPT_TOKENS, REPO, RESULTS, busy_cores, run_worker

VARIANTS = {"fp32": ("none", "merged"), "int8": ("int8", "merged"), "int4": ("int4", "merged"),
            "fp32-separate": ("none", "separate"), "int8-dynamic": ("", "")}
GOALS = {"fp32_speedup": 1.5, "int8_speedup": 2.5, "int8_size": 0.35, "int4_size": 0.25,
         "int8_agreement": 0.95}
QUICK = ["--set", "model=tiny-llama", "--set", "rounds=2", "--set", "local-steps=2", "--set", "num-clients=2"]


def simulate(run: Path, quick: bool) -> float:
    """Run the federation into ``run``; returns its wall time."""
    start = time.perf_counter()
    cli = Path(sys.executable).parent / "pollinate"
    subprocess.run([str(cli), "simulate", "--run-dir", str(run), *(QUICK if quick else [])], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def export(source: Path, out: Path, quantization: str, mode: str) -> float:
    """One ``export_bundle`` in its own process; returns its wall time."""
    code = ("import sys; from pathlib import Path; from pollinate.edge.export import export_bundle; "
            "export_bundle(Path(sys.argv[1]), Path(sys.argv[2]), quantization=sys.argv[3], "
            "adapter_mode=sys.argv[4])")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(source), str(out), quantization, mode], check=True,
                   capture_output=True)
    return time.perf_counter() - start


_DYNAMIC = """
import sys, shutil
from pathlib import Path
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from pollinate.edge import manifest
from pollinate.edge.bundle_pb2 import Quantization
from pollinate.edge.quantize import untie_transposed_weights
source, out = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(source, out)
model = onnx.load(str(out / "model.onnx"))
del model.graph.value_info[:]
untie_transposed_weights(model)
quantize_dynamic(model, str(out / "model.onnx"), per_channel=True, weight_type=QuantType.QInt8,
                 op_types_to_quantize=["MatMul", "Gather"], extra_options={"MatMulConstBOnly": True})
bundle, _ = manifest.read_bundle_manifest(out, check_files=False)
bundle.graph.quantization = Quantization.INT8
manifest.write_bundle_manifest(out, bundle)
"""


def int8_dynamic(fp32: Path, out: Path) -> float:
    """The comparison variant: plain quantize_dynamic on the fp32 bundle's graph; returns its wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _DYNAMIC, str(fp32), str(out)], check=True, capture_output=True)
    return time.perf_counter() - start


def export_round_adapters(run: Path, bundle: Path, folder: Path) -> list[Path]:
    """Every round's adapter as a file for the separate bundle (no torch, no re-export)."""
    from pollinate.edge.adapters import export_adapter

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for checkpoint in sorted((run / "checkpoints").glob("round-*")):
        path = folder / f"{checkpoint.name}.onnx_adapter"
        paths.append(path if path.is_file() else export_adapter(checkpoint, bundle, path))
    return paths


def build(run: Path, work: Path) -> dict[str, Any]:
    """Export every variant; sizes and export times."""
    info: dict[str, Any] = {}
    for name, (quantization, mode) in VARIANTS.items():
        timing = work / f"{name}.export-seconds"  # beside the bundle: a reused bundle keeps its export time
        reused = (work / name / "manifest.pb").is_file()
        if not reused:
            shutil.rmtree(work / name, ignore_errors=True)
            seconds = (int8_dynamic(work / "fp32", work / name) if name == "int8-dynamic"
                       else export(run, work / name, quantization, mode))
            timing.write_text(f"{seconds}\n")
        info[name] = {"export_s": float(timing.read_text()) if timing.is_file() else None, "reused": reused}
        info[name]["graph_bytes"] = (work / name / "model.onnx").stat().st_size
        info[name]["bundle_bytes"] = sum(p.stat().st_size for p in (work / name).rglob("*") if p.is_file())
    return info


def wait_for_quiet(limit_s: float, threshold: float = 0.5) -> float:
    """Wait (at most ``limit_s``) until other work leaves the CPUs idle; returns the busy cores seen last.

    Timings on a shared 2-core machine are only meaningful when nothing else runs beside them.
    """
    deadline = time.monotonic() + limit_s
    busy = busy_cores(5.0)
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(25)
        busy = busy_cores(5.0)
    return busy


def measure(run: Path, work: Path, threads: int, repeats: int,
            fidelity: dict[str, Any] | None) -> dict[str, Any]:
    """Latency, fidelity (unless given: it does not depend on timing) and adapter path, one process each."""
    timing = ["--threads", str(threads), "--repeats", str(repeats)]
    latency = {"torch": run_worker("edge_latency.py", ["--backend", "torch", "--run", str(run),
                                                       "--bundle", str(work / "fp32"), *timing])}
    for name in VARIANTS:
        latency[name] = run_worker("edge_latency.py",
                                   ["--backend", "ort", "--bundle", str(work / name), *timing])
    if fidelity is None:
        reference = work / "reference.json"
        fidelity = {"torch": run_worker("edge_fidelity.py", ["--backend", "torch", "--run", str(run),
                                                             "--out", str(reference)])}
        for name in VARIANTS:
            fidelity[name] = run_worker("edge_fidelity.py", ["--backend", "ort", "--bundle", str(work / name),
                                                             "--reference", str(reference)])
    adapters = export_round_adapters(run, work / "fp32-separate", work / "adapters")
    separate, threads_arg = str(work / "fp32-separate"), ["--threads", str(threads)]
    files = [a for p in adapters for a in ("--adapter", str(p))]
    adapter_path = {
        "merged": run_worker("edge_adapters.py", ["--mode", "forward", "--bundle", str(work / "fp32"),
                                                  *threads_arg]),
        "separate": run_worker("edge_adapters.py", ["--mode", "forward", "--bundle", separate,
                                                    "--adapter", str(adapters[-1]), *threads_arg]),
        "swap": run_worker("edge_adapters.py",
                           ["--mode", "swap", "--bundle", separate, *files, *threads_arg]),
        "adapter_files": {p.name: p.stat().st_size for p in adapters},
    }
    return {"latency": latency, "fidelity": fidelity, "adapter_path": adapter_path}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


_LABELS = {"int8-dynamic": "int8-dynamic (comparison)"}


def _mark(met: bool) -> str:
    return "met" if met else "**not met**"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def report(result: dict[str, Any]) -> str:
    """The markdown section."""
    lat, fid, size, ap = result["latency"], result["fidelity"], result["exports"], result["adapter_path"]
    eager = lat["torch"]["tokens_per_s"]
    lines = [
        "# Edge benchmarks",
        "",
        f"SmolLM2-135M-Instruct after a short federated fine-tune (`{result['federation']}`), exported with "
        "`pollinate export` and run by `pollinate.edge.EdgeModel` (onnxruntime "
        f"{result['versions'].get('onnxruntime', '?')}). Machine: {result['machine']['cpus']} CPU cores, "
        f"{result['machine']['platform']}; every backend timed in its own process with "
        f"{result['threads']} thread(s). Rerun: `python benchmarks/edge_bench.py` "
        "(results in `benchmarks/results/edge.json`).",
        "",
        f"## Latency (batch 1, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, greedy, KV cache)",
        "",
        "tokens/s counts all 32 tokens over the whole call (prefill included); decode tokens/s is the 31 "
        "tokens after the first. The PyTorch baseline is eager fp32 with the adapter merged and a KV cache. "
        "Busy cores: the machine's mean busy cores while the backend was timed (its own thread counts 1).",
        "",
        "| backend | first token | tokens/s | decode tokens/s | vs eager | goal | busy cores |",
        "|---|---|---|---|---|---|---|",
    ]
    goals = {"fp32": GOALS["fp32_speedup"], "int8": GOALS["int8_speedup"]}
    for name in ["torch", *VARIANTS]:
        r = lat[name]
        ratio = r["tokens_per_s"] / eager
        goal = f"≥ {goals[name]}×: {_mark(ratio >= goals[name])}" if name in goals else ""
        label = "PyTorch eager" if name == "torch" else f"ORT {_LABELS.get(name, name)}"
        lines.append(f"| {label} | {r['ttft_s'] * 1000:.0f} ms | {r['tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {ratio:.2f}× | {goal} | {r.get('busy_cores', '')} |")
    fp32_bytes = size["fp32"]["graph_bytes"]
    lines += ["", "## Size of the graph (`model.onnx`)", "",
              "| variant | size | vs fp32 | goal |", "|---|---|---|---|"]
    size_goals = {"int8": GOALS["int8_size"], "int4": GOALS["int4_size"]}
    for name in VARIANTS:
        ratio = size[name]["graph_bytes"] / fp32_bytes
        goal = f"≤ {size_goals[name]}×: {_mark(ratio <= size_goals[name])}" if name in size_goals else ""
        label = _LABELS.get(name, name)
        lines.append(f"| {label} | {_mb(size[name]['graph_bytes'])} | {ratio:.2f}× | {goal} |")
    lines += [
        "", f"## Fidelity ({fid['torch']['examples']} held-out examples no client trained on)", "",
        "Token agreement: with PyTorch's greedy answer fed in (teacher forcing), the share of answer "
        "positions where the variant's argmax is PyTorch's token. Exact answers: free-running greedy answers "
        "(at most 32 tokens) identical to PyTorch's. Eval loss: mean cross-entropy per answer token.", "",
        "| variant | token agreement | exact answers | eval loss | goal |", "|---|---|---|---|---|",
        f"| PyTorch eager | 100% | 100% | {fid['torch']['eval_loss']:.4f} | |",
    ]
    for name in VARIANTS:
        r = fid[name]
        goal = (f"≥ {GOALS['int8_agreement']:.0%}: {_mark(r['token_agreement'] >= GOALS['int8_agreement'])}"
                if name == "int8" else "")
        label = _LABELS.get(name, name)
        lines.append(f"| ORT {label} | {r['token_agreement']:.1%} | {r['exact_answers']:.0%} | "
                     f"{r['eval_loss']:.4f} | {goal} |")
    lines += [
        "", "`int8` is `pollinate export --quantize int8`: every MatMul weight in 8-bit blocks of 32 with "
        "fp32 scales (onnxruntime `MatMulNBits`, int8 arithmetic with activations quantised per block at "
        "run time) and the embedding table int8. `int8-dynamic` is onnxruntime's plain `quantize_dynamic` "
        "on every MatMul and Gather, for comparison: faster, but one scale per activation tensor loses "
        "the outliers entering the MLP down projections, and with them a third of the greedy tokens. "
        "`int4` is 4-bit blocks of 32 (`MatMulNBits`, `GatherBlockQuantized`) with int8 arithmetic; a "
        "135M-parameter model loses much at 4 bits (the embedding and LM head alone kept fp32 still "
        "agree on about 71%).",
    ]
    merged, separate, swap = ap["merged"], ap["separate"], ap["swap"]
    adapter_bytes = max(ap["adapter_files"].values())
    base_bytes = size["fp32-separate"]["graph_bytes"]
    prefill = separate["prefill_64_s"] / merged["prefill_64_s"] - 1
    decode = separate["decode_step_s"] / merged["decode_step_s"] - 1
    lines += [
        "", "## Adapter path (fp32, base exported once, one adapter file per round)", "",
        "| measure | value |", "|---|---|",
        f"| base graph (separate) | {_mb(base_bytes)} |",
        f"| adapter file per round | {_mb(adapter_bytes)} ({adapter_bytes / base_bytes:.1%} of the base) |",
        f"| swap, onnxruntime only (load + run options) | {swap['swap_onnxruntime_s'] * 1000:.2f} ms |",
        f"| swap, verified (manifest, SHA-256, checks, load) | {swap['swap_full_s'] * 1000:.2f} ms |",
        f"| prefill 64 tokens: merged / separate + adapter | {merged['prefill_64_s'] * 1000:.1f} ms / "
        f"{separate['prefill_64_s'] * 1000:.1f} ms ({prefill:+.1%}) |",
        f"| decode step: merged / separate + adapter | {merged['decode_step_s'] * 1000:.2f} ms / "
        f"{separate['decode_step_s'] * 1000:.2f} ms ({decode:+.1%}) |",
        "", "## Export", "", "| variant | export time | bundle size |", "|---|---|---|",
    ]
    for name in VARIANTS:
        seconds = size[name]["export_s"]
        shown = "not recorded" if seconds is None else f"{seconds:.0f} s"
        shown += " (bundle reused from an earlier run)" if size[name].get("reused") else ""
        lines.append(f"| {name} | {shown} | {_mb(size[name]['bundle_bytes'])} |")
    lines += ["", f"Machine load (busy cores) before the measurements: {result['busy_cores_before']}.", ""]
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import importlib.metadata

    names = ("onnxruntime", "onnx", "torch", "transformers", "peft")
    return {n: importlib.metadata.version(n) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a finished run (default: run the default federation)")
    parser.add_argument("--work", type=Path, help="where bundles go (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny-llama, for checking the script")
    parser.add_argument("--reuse-fidelity", type=Path, metavar="JSON",
                        help="take the fidelity figures from an earlier results file of the same bundles")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before timing, wait up to this long for the machine to become idle")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pollinate-edge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run, federation_s = args.run_dir, None
    if run is None:
        run = work / "run"
        if not (run / "LATEST").is_file():
            federation_s = simulate(run, args.quick)
    result: dict[str, Any] = {
        "federation": "pollinate simulate" + (" " + " ".join(QUICK) if args.quick else ""),
        "federation_s": federation_s, "run_dir": str(run), "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": _versions(), "exports": build(run, work),
    }
    result["busy_cores_before"] = wait_for_quiet(args.wait_quiet) if args.wait_quiet else busy_cores()
    fidelity = json.loads(args.reuse_fidelity.read_text())["fidelity"] if args.reuse_fidelity else None
    result.update(measure(run, work, args.threads, args.repeats, fidelity))
    RESULTS.mkdir(exist_ok=True)
    name = "edge.quick" if args.quick else "edge"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    markdown = report(result)
    if not args.quick:
        (REPO / "docs" / "benchmarks-edge.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
