"""Run every benchmark, one after the other, each in its own process; then write docs/benchmarks.md.

    python benchmarks/run_all.py            # this page's set (about 15-20 minutes on 2 cores), then the doc
    python benchmarks/run_all.py --quick    # smoke versions; writes benchmarks/results/benchmarks.quick.md
    python benchmarks/run_all.py --docs-only  # rewrite the doc from the results already there
    python benchmarks/run_all.py --only trainer  # rerun one benchmark, then rewrite the doc

Every figure in the doc is read from benchmarks/results/<name>.json, written by the scripts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, REPO, RESULTS, CpuMeter, mark, save_result, table

BENCHMARKS = ("overhead", "trainer", "learning")
QUIET_CORES = 0.3  # busy cores below which the machine counts as idle
DOC = REPO / "docs" / "benchmarks.md"


def num(value: float | None, spec: str) -> str:
    """``value`` formatted, or a dash where a quick run has none."""
    return "-" if value is None else format(value, spec)


def wait_quiet(limit: float) -> float | None:
    """Wait (up to ``limit`` s) until the machine is idle: timings on 2 shared cores mean nothing
    while other programs run. Returns the busy cores of the last 5 s sample."""
    deadline, busy = time.monotonic() + limit, None
    while True:
        meter = CpuMeter()
        time.sleep(5.0)
        busy = meter.busy_cores()
        if busy is None or busy < QUIET_CORES or time.monotonic() >= deadline:
            return busy
        print(f"   machine busy ({busy:.2f} cores), waiting", flush=True)


def run(name: str, quick: bool, quiet_wait: float) -> float:
    """Run one benchmark script; returns its wall time. A failure stops the set."""
    cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), *(["--quick"] if quick else [])]
    busy = wait_quiet(quiet_wait)
    print(f"== {name}: {' '.join(cmd)}  (busy cores before: {busy})", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - start


def load(name: str, quick: bool) -> dict[str, Any]:
    """A benchmark's results file."""
    return dict(json.loads((RESULTS / f"{name}{'.quick' if quick else ''}.json").read_text()))


def overhead_section(res: dict[str, Any], minutes: float | None) -> list[str]:
    s = res["settings"]
    lo, hi = res["anchor"]["startup_seconds"]
    lines = [
        "## 1. Framework overhead (`benchmarks/overhead.py`)", "",
        f"`pollinate simulate` with `{s['model']}`, {s['rounds']} rounds, {s['local-steps']} local steps "
        f"of {s['batch-size']} x {s['max-seq-len']} tokens per client, clients one at a time "
        f"(`sim.workers={s['sim.workers']}`), each client count in a fresh process. "
        "The factor is a round's time from sending the instructions to the aggregated adapter "
        "(`round_seconds`, server evaluation excluded) over the sum of the clients' own training time "
        "(`client_train_seconds`): 1.00 would mean pollinate and Flower cost nothing. "
        "Round 1 also loads the model in the simulation worker; steady is the mean of rounds >= 2. "
        "The anchor is a stock Flower FedAvg app measured earlier on the same model and settings.", "",
    ]
    rows = []
    for r in res["results"]:
        rows.append([r["num_clients"], f"{r['ratio_round1']:.2f}", num(r["anchor_round1"], ".2f"),
                     mark(r["round1_met"]), num(r["ratio_steady"], ".3f"), f"{res['anchor']['steady']:.2f}",
                     mark(r["steady_met"])])
    lines += [table(["clients", "round 1 factor", "anchor", "goal: no worse than anchor",
                     "steady factor", "anchor", f"goal: <= {res['goal']['steady_max']}"], rows), ""]
    rows = []
    for r in res["results"]:
        rows.append([r["num_clients"], f"{r['wall_seconds']:.0f}", f"{r['sum_round_seconds']:.1f}",
                     f"{r['sum_eval_seconds']:.1f}", f"{r['eval_seconds_initial']:.1f}",
                     f"{r['eval_seconds_mean_after_rounds']:.1f}", f"{r['fixed_seconds']:.1f}",
                     f"{r['outside_run_seconds']:.1f}", f"{r['inside_run_other_seconds']:.1f}",
                     f"{lo:.0f}-{hi:.0f}", f"{r['busy_cores']:.2f}"])
    lines += [
        "Where the wall time goes (seconds). Fixed = command wall time (measured around the process) "
        "- all rounds - all server evaluations; it splits into what happens outside the round loop "
        "(interpreter, imports, global model, Ray start-up and shutdown, sample answers) and the rest "
        "inside it (checkpoints, report).", "",
        table(["clients", "wall", "rounds", "server evals", "eval round 0", "eval per later round",
               "fixed", "of which outside the loop", "inside the loop", "anchor fixed",
               "busy cores"], rows), "",
        "Busy cores is the machine-wide mean during the run; the run alone keeps about one core busy "
        "(the server waits while the single worker trains), so more means something else was running "
        "and the absolute seconds (not the factors, which divide two times taken together) are inflated.",
        "",
        *[f"With {r['num_clients']} clients the server's evaluation before round 1 took "
          f"{r['eval_seconds_initial']:.1f} s against {r['eval_seconds_mean_after_rounds']:.1f} s per later "
          "round on the same held-out split: it runs while Ray starts the simulation worker."
          for r in res["results"] if r["eval_seconds_initial"] > 1.5 * r["eval_seconds_mean_after_rounds"]],
        "",
        "Per round:", "",
        table(["clients", "round", "round s", "clients' training s", "factor",
               "overhead per client s", "server eval s"],
              [[r["num_clients"], x["round"], f"{x['round_seconds']:.1f}",
                f"{x['client_train_seconds']:.1f}", f"{x['ratio']:.3f}",
                f"{x['overhead_per_client_seconds']:.2f}", f"{x['eval_seconds']:.1f}"]
               for r in res["results"] for x in r["rounds"]]), "",
    ]
    if minutes is not None:
        lines += [f"This benchmark took {minutes:.1f} min.", ""]
    return lines


def trainer_section(res: dict[str, Any], minutes: float | None) -> list[str]:
    first = res["results"][0]
    lines = [
        "## 2. Local training step (`benchmarks/trainer.py`)", "",
        f"Tokens per second of `pollinate.training.train_local` on the peft model the ClientApp builds, "
        f"against a bare torch + peft loop written in the script (`get_peft_model` with the same LoRA "
        f"settings: rank {res['lora_rank']}, targets {', '.join(res['lora_targets'])}; AdamW; forward, "
        f"backward, step, zero_grad over batches collated before the clock starts). Same model "
        f"`{res['model']}`, same tokens (client 0's chatterbot share, {res['examples']} examples each "
        f"padded or trimmed to {first['seq_len']} tokens, {res['non_pad_fraction']:.0%} of positions "
        f"real), same batch order, {res['threads']} torch thread. A warm-up block of "
        f"{res['warmup_steps']} steps per loop is excluded; then {first['pairs']} alternating pairs of "
        f"blocks (ours, bare) of {first['steps_per_block']} steps; tokens/s counts every position of "
        "the batch, from the median block. Both loops start from the same adapter and take the same "
        "steps, so their losses must agree: the largest difference is shown.", "",
    ]
    rows = [[f"{r['batch_size']} x {r['seq_len']}", f"{r['tokens_per_second']['ours']:.0f}",
             f"{r['tokens_per_second']['bare']:.0f}",
             f"{r['seconds_per_step']['ours']:.2f} / {r['seconds_per_step']['bare']:.2f}",
             f"{r['ratio']:.3f}", f"{r['median_pair_ratio']:.3f}", f"{r['cpu_ratio']:.3f}",
             f"{r['max_loss_difference']:.1e}", f"{r['busy_cores']:.2f}", mark(r["met"])]
            for r in res["results"]]
    lines += [table(["batch", "ours tokens/s", "bare tokens/s", "s per step (ours / bare)",
                     "ours / bare", "median of pair ratios", "ours / bare, CPU time",
                     "max loss difference", "busy cores", f"goal: >= {res['goal_min_ratio']}"], rows), "",
              "The goal is judged on the wall-clock ratio of the median blocks. The CPU-time ratio "
              "(this process's CPU seconds per block) hardly changes when other programs share the "
              "cores; busy cores is the machine-wide mean while the benchmark ran (it alone keeps one "
              "core busy), so a value near 2 means something else was running.", ""]
    if minutes is not None:
        lines += [f"This benchmark took {minutes:.1f} min.", ""]
    return lines


def learning_section(res: dict[str, Any], minutes: float | None) -> list[str]:
    fed, cen = res["federated"], res["centralized"]
    c = cen["config"]
    shape = f"{c['num-clients']} clients x {c['rounds']} rounds x {c['local-steps']} local steps"
    lines = [
        "## 3. What the demo learns (`benchmarks/learning.py`)", "",
        f"Federated: `pollinate simulate` with every default ({shape} of batch {c['batch-size']}, "
        f"max-seq-len {c['max-seq-len']}, lr {c['lr']}, LoRA rank {c['lora.rank']}, strategy "
        f"{c['strategy']}, natural split of chatterbot by category, {c['sim.workers']} workers). "
        f"Centralized reference, chosen to see the same total number of examples: one model with the "
        f"same base and the same initial adapter, trained by `train_local` (one AdamW) on the union of "
        f"the {c['num-clients']} clients' shares ({cen['union_examples']} examples) for "
        f"rounds x local-steps x clients = {cen['steps']} steps of batch {cen['batch_size']}. Both are "
        f"evaluated on the same {c['eval-examples']} held-out examples no client sees "
        "(`GlobalModel.evaluate`, loss per answer token).", "",
    ]
    rows = []
    for label, r in ((f"federated ({shape})", fed), (f"centralized ({cen['steps']} steps)", cen)):
        b, a = r["initial_eval"], r["final_eval"]
        rows.append([label, r["examples_seen"], r["tokens_seen"], f"{b['loss']:.3f}", f"{a['loss']:.3f}",
                     f"{b['perplexity']:.1f} -> {a['perplexity']:.1f}", f"{a['loss'] - b['loss']:+.3f}"])
    by_round = ", ".join(f"round {k}: {v:.3f}" for k, v in fed["eval_loss_by_round"].items())
    lines += [table(["training", "examples seen", "tokens seen", "eval loss before", "eval loss after",
                     "perplexity", "change"], rows), "",
              f"Federated held-out loss by round: {by_round}. "
              f"Federated final loss - centralized final loss: {res['gap_final_loss']:+.3f}. "
              f"Same starting loss for both: {'yes' if res['same_start'] else 'NO'}. "
              "No goal is set for this benchmark; it is the reference the demo's figures are read against.",
              ""]
    if fed.get("sample"):
        s = fed["sample"]
        lines += [f"First held-out question: \"{s['prompt']}\"; base model: \"{s['base']}\"; "
                  f"after federated training: \"{s['fine_tuned']}\"; reference: \"{s['reference']}\".", ""]
    if minutes is not None:
        lines += [f"This benchmark took {minutes:.1f} min (federated run {fed['wall_seconds']:.0f} s, "
                  f"centralized {cen['wall_seconds']:.0f} s).", ""]
    return lines


def goals(results: dict[str, dict[str, Any]]) -> list[str]:
    """One summary table of every goal."""
    rows = []
    o = results["overhead"]
    for r in o["results"]:
        rows.append([f"overhead, {r['num_clients']} clients, round 1",
                     f"{r['ratio_round1']:.2f}", f"<= {num(r['anchor_round1'], '.2f')} (anchor)",
                     mark(r["round1_met"])])
        rows.append([f"overhead, {r['num_clients']} clients, steady", num(r["ratio_steady"], ".3f"),
                     f"<= {o['goal']['steady_max']}", mark(r["steady_met"])])
    t = results["trainer"]
    for r in t["results"]:
        rows.append([f"training step, batch {r['batch_size']} x {r['seq_len']}, ours / bare",
                     f"{r['ratio']:.3f}", f">= {t['goal_min_ratio']}", mark(r["met"])])
    return [table(["figure", "measured", "goal", "status"], rows), ""]


def write_doc(quick: bool, minutes: dict[str, float]) -> Path:
    """docs/benchmarks.md (a quick run writes benchmarks/results/benchmarks.quick.md instead)."""
    results = {name: load(name, quick) for name in BENCHMARKS}
    m = results["overhead"]["machine"]
    code = (f"pollinate at commit {m['git_head']}" if not m.get("uncommitted_pollinate_files")
            else f"pollinate at commit {m['git_head']} with {m['uncommitted_pollinate_files']} "
                 "uncommitted files under pollinate/")
    lines = [
        "# Benchmarks", "",
        f"Measured on {dt.date.today().isoformat()} on a machine with {m['cpus']} CPU cores and no GPU "
        f"(Python {m['python']}, {m['platform']}), {code}, model SmolLM2-135M-Instruct "
        "(`smollm2-135m-instruct`, fp32, LoRA). Every figure below is read from "
        "`benchmarks/results/*.json`, written by the scripts in `benchmarks/`. Rerun this page with "
        "`.venv/bin/python benchmarks/run_all.py` (about 15-20 minutes on 2 cores) and every page with "
        "`make bench` (about 3 hours; the benchmarks run one after the other, never together); each "
        "script also runs alone (`.venv/bin/python benchmarks/overhead.py`, add `--quick` for a "
        "smoke version).", "",
        "The other benchmark pages, each written by its own scripts (`make bench` runs them too): "
        "[exact aggregation](benchmarks-strategies.md), [memory budgets](benchmarks-memory.md), "
        "[edge export](benchmarks-edge.md).", "",
        "## Goals", "",
        *goals(results),
        *overhead_section(results["overhead"], minutes.get("overhead")),
        *trainer_section(results["trainer"], minutes.get("trainer")),
        *learning_section(results["learning"], minutes.get("learning")),
        *kept_sections(DOC),
        *strategies_section(quick),
    ]
    path = RESULTS / "benchmarks.quick.md" if quick else DOC
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


GENERATED = ("## Goals", "## 1. ", "## 2. ", "## 3. ", "## Exact aggregation")
"""Headings of the sections this script writes; every other ``## `` section of the page is kept as it is
(the headlines other benchmark scripts' pages are summed up in, written by hand from their results)."""


def kept_sections(path: Path) -> list[str]:
    """The lines of every section of ``path`` this script does not write, in their order."""
    if not path.exists():
        return []
    kept: list[str] = []
    keep = False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            keep = not line.startswith(GENERATED)
        if keep:
            kept.append(line)
    return [*kept, ""] if kept else []


def strategies_section(quick: bool) -> list[str]:
    """The headlines of the exact-aggregation benchmarks, read from their own results files."""
    import importlib

    lines = ["## Exact aggregation, heterogeneous ranks", "",
             "Headlines of [benchmarks-strategies.md](benchmarks-strategies.md), where the settings, the "
             "per-round tables, the plot and the byte tables are.", ""]
    for name, title in (("strategies_quality", "Quality"), ("aggregation_cost", "Aggregation cost"),
                        ("strategies_bytes", "Bytes on the wire against the formulas")):
        path = RESULTS / f"{name}{'.quick' if quick else ''}.json"
        if not path.exists():
            lines += [f"{title}: not run yet (`benchmarks/{name}.py`).", ""]
            continue
        module, out = importlib.import_module(name), json.loads(path.read_text())
        lines += [f"{title} (`benchmarks/{name}.py`):", ""]
        if name == "strategies_quality":
            lines += [module.report(out), ""]
        lines += [line if line.startswith("- ") else f"- {line}" for line in module.findings(out)] + [""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke versions of every benchmark")
    parser.add_argument("--docs-only", action="store_true", help="only rewrite the doc from the results")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each benchmark wait up to SECONDS for the machine to be idle")
    args = parser.parse_args()
    timing = RESULTS / f"run_all{'.quick' if args.quick else ''}.json"
    minutes: dict[str, float] = json.loads(timing.read_text())["minutes"] if timing.is_file() else {}
    if not args.docs_only:
        for name in args.only or BENCHMARKS:
            minutes[name] = run(name, args.quick, args.wait_quiet) / 60
            save_result("run_all", {"quick": args.quick, "minutes": minutes,  # after each: a rerun
                                    "total_minutes": sum(minutes.values())})  # of one keeps the rest
    print(f"wrote {write_doc(args.quick, minutes)}")
    for name, m in minutes.items():
        print(f"{name}: {m:.1f} min")


if __name__ == "__main__":
    main()
