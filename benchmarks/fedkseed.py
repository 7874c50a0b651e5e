"""FedKSeed: bytes per round, client memory, the cost of a step and a replay, and what it learns.

* ``--bytes``: what Flower serialises at K = 4096 and τ = 200 (a client's upload of τ pairs and the
  round's K per-seed sums), on tiny-llama and SmolLM2, against the paper's 4K + 8τ = 17,984 B; and the
  bytes a real tiny-llama simulation recorded (``metrics.jsonl``) at the same K and τ.
* ``--memory``: a FedKSeed client's measured peak (both ``params`` modes) against an inference-only
  forward with the loss at the same batch and sequence length, and against a LoRA r8 client's peak
  (SmolLM2, 4 x 64 tokens, one thread, fresh processes; ``pollinate.client.measure``).
* ``--time``: one zeroth-order step and one replay of a 4096-seed update with every seed used, ``full``
  against ``lora``, on SmolLM2 (one thread, median of repeats).
* ``--learning``: SmolLM2 on chatterbot (the demo configuration): eval loss per round of ``fedkseed`` at
  its defaults against the zero-shot model and against ``fedit`` given about the same client wall time.

    python benchmarks/fedkseed.py --bytes --memory --time --learning

Results go to ``benchmarks/results/fedkseed.json`` (each part kept until rerun) and
``docs/benchmarks-fedkseed.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, events_of, machine, read_events, read_summary, run_simulate, table

DOC = REPO / "docs" / "benchmarks-fedkseed.md"
PATH = RESULTS / "fedkseed.json"
K, TAU = 4096, 200
PAPER_BYTES = 4 * K + 8 * TAU
GOAL_BYTES = 18_432
SMOL = "smollm2-135m-instruct"


def bytes_part() -> dict[str, Any]:
    """Serialised bytes of an upload and an update at K and τ, per model, and from a real simulation."""
    import torch

    from pollinate.config import RunConfig
    from pollinate.methods.fedkseed.method import SeedSums, ZerothOrderTrainee
    from pollinate.protocol import to_record, wire_bytes

    out: dict[str, Any] = {}
    for model in ("tiny-llama", SMOL):
        cfg = RunConfig.from_run_config({"model": model, "strategy": "fedkseed", "fedkseed.seeds": K,
                                         "fedkseed.steps": TAU})
        trainee = ZerothOrderTrainee(cfg)
        gen = torch.Generator().manual_seed(0)
        trainee.load({"seed_index": torch.randint(K, (TAU,), generator=gen).to(torch.int32),
                      "seed_grad": torch.randn(TAU, generator=gen)}, seed=0)
        out[model] = {"up": wire_bytes(to_record(trainee.upload())),
                      "down": wire_bytes(to_record(SeedSums(torch.randn(K, generator=gen)).to_flat()))}
    settings = {"model": "tiny-llama", "strategy": "fedkseed", "fedkseed.seeds": K, "fedkseed.steps": TAU,
                "rounds": 2, "num-clients": 4, "eval-examples": 8}
    with tempfile.TemporaryDirectory() as work:
        done = run_simulate(settings, Path(work))
        clients = [e for e in read_events(done["run_dir"]) if e["event"] == "client"]
    later = [e for e in clients if e["round"] == 2]
    out["simulation"] = {"up": statistics.mean(e["bytes_up"] for e in later),
                         "down": statistics.mean(e["bytes_down"] for e in later), "settings": settings}
    return out


def memory_part() -> dict[str, Any]:
    """Peaks at 4 x 64 on SmolLM2: FedKSeed (lora, full), an inference forward, a LoRA r8 client."""
    from pollinate.client.measure import measure_forward_peak, measure_method_peak
    from pollinate.config import RunConfig
    from pollinate.methods import build
    from pollinate.methods.lora.method import LoraPlan
    from pollinate.methods.plan import Plan

    rows: dict[str, Any] = {}
    plan = Plan("fedkseed", 4, 1, 64, False)
    for params in ("lora", "full"):
        settings = {"model": SMOL, "strategy": "fedkseed", "fedkseed.params": params}
        measured = measure_method_peak("fedkseed", settings, plan)
        method = build("fedkseed", RunConfig.from_run_config(settings))
        rows[f"fedkseed {params}"] = {"peak": measured.peak,
                                      "estimate": method.estimate(method.dims(), plan).total}
    rows["inference forward"] = {"peak": measure_forward_peak(SMOL, "generation", plan).peak}
    lora_plan = LoraPlan("lora", 4, 1, 64, False, rank=8)
    lora = build("lora", RunConfig.from_run_config({"model": SMOL}))
    rows["lora r8"] = {"peak": measure_method_peak("lora", {"model": SMOL}, lora_plan).peak,
                       "estimate": lora.estimate(lora.dims(), lora_plan).total}
    return rows


def time_part(repeats: int = 3) -> dict[str, Any]:
    """Median seconds of one zeroth-order step and of replaying 4096 used seeds, per params mode."""
    import torch

    from pollinate import workload
    from pollinate.config import RunConfig
    from pollinate.data import encode_dataset
    from pollinate.methods.base import TrainSpec
    from pollinate.methods.fedkseed.method import SeedSums, ZerothOrderTrainee

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for params in ("lora", "full"):
        cfg = RunConfig.from_run_config({"model": SMOL, "strategy": "fedkseed", "fedkseed.params": params,
                                         "fedkseed.seeds": K})
        trainee = ZerothOrderTrainee(cfg)
        examples = encode_dataset(workload.shares(cfg)[0], trainee.tokenizer, cfg.task, cfg.max_seq_len)
        spec = TrainSpec(1, cfg.batch_size, cfg.fedkseed.lr, cfg.batch_size)
        steps = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            trainee.train(examples, spec, seed=i)
            steps.append(time.perf_counter() - start)
        used = 64  # time 64 regenerations, scale to K
        sums = torch.zeros(K)
        sums[:used] = 1e-3
        start = time.perf_counter()
        trainee.merge(SeedSums(sums))
        per_seed = (time.perf_counter() - start) / used
        out[params] = {"step_seconds": statistics.median(steps[1:]), "replay_seconds_per_seed": per_seed,
                       "replay_seconds_all_seeds": per_seed * K,
                       "trained_numbers": sum(p.numel() for p in trainee.params)}
    return out


def learning_part(fedit_steps: int) -> dict[str, Any]:
    """The demo configuration: fedkseed at its defaults, fedit at ``fedit_steps`` local steps."""
    out: dict[str, Any] = {}
    runs: dict[str, dict[str, Any]] = {"fedkseed": {"strategy": "fedkseed"}}
    runs[f"fedit {fedit_steps} steps"] = {"strategy": "fedit", "local-steps": fedit_steps}
    for label, settings in runs.items():
        with tempfile.TemporaryDirectory() as work:
            done = run_simulate(settings, Path(work))
            events = read_events(done["run_dir"])
            summary = read_summary(done["run_dir"])
        evals = events_of(events, "evaluate")
        trains = [e for e in events if e["event"] == "train"]
        out[label] = {"eval": [evals[r]["loss"] for r in sorted(evals)],
                      "client_seconds_per_round": statistics.mean(e["client_train_seconds"] for e in trains),
                      "bytes_up_per_round": statistics.mean(e["bytes_up"] for e in trains),
                      "wall_seconds": done["wall_seconds"], "seconds_per_step": summary["seconds_per_step"],
                      "settings": settings}
    return out


def write_doc(out: dict[str, Any]) -> None:
    lines = ["# FedKSeed (benchmarks/fedkseed.py)", "",
             "Every figure is read from `benchmarks/results/fedkseed.json`; rerun with the command in the "
             "script's docstring. One torch thread per client.", ""]
    if "bytes" in out:
        b = out["bytes"]
        rows = [[m, b[m]["up"], b[m]["down"], f"{max(b[m]['up'], b[m]['down']) <= GOAL_BYTES}"]
                for m in ("tiny-llama", SMOL)]
        rows.append(["tiny-llama simulation (metrics.jsonl, round 2)", f"{b['simulation']['up']:.0f}",
                     f"{b['simulation']['down']:.0f}",
                     f"{max(b['simulation']['up'], b['simulation']['down']) <= GOAL_BYTES}"])
        lines += [f"## Bytes per client and round at K = {K}, τ = {TAU}", "",
                  table(["model", "B up (τ pairs)", "B down (K sums)", f"each way ≤ {GOAL_BYTES} B"], rows),
                  "", f"The paper's figure, 4K + 8τ = {PAPER_BYTES} B, counts up and down together without "
                  "framing; Flower's record framing adds the rest. The same on both models: the payload "
                  "depends on K and τ only.", ""]
    if "memory" in out:
        mem = out["memory"]
        ref = mem["inference forward"]["peak"]
        rows = [[k, f"{v['peak'] / 1e6:.0f}", f"{v['estimate'] / 1e6:.0f}" if "estimate" in v else "-",
                 f"{v['peak'] / ref:.3f}"] for k, v in mem.items()]
        lines += ["## Client peak memory (SmolLM2, 4 x 64 tokens)", "",
                  table(["client", "measured peak MB", "estimate MB", "peak / inference forward"], rows),
                  "", "Goal: FedKSeed ≤ 1.1x an inference-only forward at the same batch and length.", ""]
    if "time" in out:
        t = out["time"]
        replay_ratio = t["full"]["replay_seconds_per_seed"] / t["lora"]["replay_seconds_per_seed"]
        rows = [[k, f"{v['trained_numbers']:,}", f"{v['step_seconds']:.2f}",
                 f"{v['replay_seconds_per_seed'] * 1e3:.1f}", f"{v['replay_seconds_all_seeds']:.1f}"]
                for k, v in t.items()]
        lines += ["## Time on SmolLM2 (batch 4 x 64, one thread)", "",
                  table(["params", "trained numbers", "s / zeroth-order step", "ms / replayed seed",
                         f"s to replay all {K} seeds"], rows),
                  "", f"full / lora: step {t['full']['step_seconds'] / t['lora']['step_seconds']:.2f}x, "
                  f"replay {replay_ratio:.0f}x.",
                  ""]
    if "learning" in out:
        runs = out["learning"]
        n = max(len(r["eval"]) for r in runs.values())
        rows = [[k, *(f"{x:.3f}" for x in r["eval"]), f"{r['client_seconds_per_round']:.0f}",
                 f"{r['bytes_up_per_round'] / 1e3:.1f}"] for k, r in runs.items()]
        lines += ["## Learning (SmolLM2, chatterbot, the demo configuration)", "",
                  table(["run", *(f"round {i}" for i in range(n)), "client s / round (all clients)",
                         "kB up / round (all clients)"], rows),
                  "", "Round 0 is the zero-shot model.", ""]
    lines += [f"Machine: {out.get('machine')}.", ""]
    DOC.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for part in ("bytes", "memory", "time", "learning"):
        parser.add_argument(f"--{part}", action="store_true")
    parser.add_argument("--fedit-steps", type=int, default=8,
                        help="fedit's local steps in --learning (about fedkseed's client time)")
    args = parser.parse_args()
    out = json.loads(PATH.read_text()) if PATH.exists() else {}
    parts = {"bytes": bytes_part, "memory": memory_part, "time": time_part,
             "learning": lambda: learning_part(args.fedit_steps)}
    for name, fn in parts.items():
        if getattr(args, name):
            out[name] = fn()
            out["machine"] = machine()
            RESULTS.mkdir(parents=True, exist_ok=True)
            PATH.write_text(json.dumps(out, indent=2, default=str) + "\n")
    write_doc(out)


if __name__ == "__main__":
    main()
