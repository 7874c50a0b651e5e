"""Memory budgets: how good the planner's estimates are, what our training step costs, how low it goes.

1. Estimator accuracy: the LoRA estimate beside the measured peak on held-out plans of SmolLM2-135M and
   MiniLM-L6 (rank, micro-batch, sequence length, checkpointing); goal: every estimate within ±20%.
2. Overhead: the peak of ``train_local`` at a plan against a bare torch + peft loop at the same plan
   (same allocator setting); goal: at most 1.05. The allocator setting itself is shown beside it.
3. The smallest budget at which pollinate still LoRA-trains SmolLM2 (the planner's minimum, checked by a
   real run whose peak must stay under it) against the peak of a naive setup (batch 8 x 256 tokens, no
   checkpointing, default allocator). The ratio is the headline.

Every peak is measured by :func:`pollinate.client.measure.measure_peak`: a fresh process with one
torch thread, VmHWM after three training steps minus VmHWM before the model was loaded. Measurements run
two at a time (each process has its own VmHWM; the machine has two cores).

Before that it measures the calibration set and fits the estimator's coefficients (:class:`Calibration`)
to it; the defaults in pollinate/methods/lora/memory.py were taken from such a fit (the accuracy table uses
the defaults, on plans that are not in the calibration set).

    python benchmarks/memory.py [--quick] [--no-calibrate] [--only SECTION] [--report-only] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from common import REPO, RESULTS, machine, mark, save_result, table

sys.path.insert(0, str(REPO))
from pollinate.client.budget import format_size  # noqa: E402
from pollinate.client.measure import measure_peak  # noqa: E402
from pollinate.client.planner import choose_plan, minimum_budget  # noqa: E402
from pollinate.methods.lora.memory import Calibration, LoraEstimator  # noqa: E402
from pollinate.methods.lora.method import LoraPlan, lora_candidates  # noqa: E402
from pollinate.methods.plan import Estimate, ModelDims, Plan, model_dims  # noqa: E402

NAME = "memory"
DOC = REPO / "docs" / "benchmarks-memory.md"
ACCURACY_GOAL = 0.20
OVERHEAD_GOAL = 1.05
MARGIN = 0.9  # the planner's default safety margin

SMOLLM, MINILM = "smollm2-135m-instruct", "minilm-l6"
TASKS = {SMOLLM: "generation", MINILM: "classification", "tiny-llama": "generation",
         "tiny-bert": "classification"}

Point = tuple[str, int, int, int, bool]  # model, rank, micro-batch, seq len, checkpointing

CALIBRATION: list[Point] = [
    *[("tiny-llama", r, b, t, c) for r, b, t, c in [
        (8, 1, 32, False), (8, 4, 64, False), (8, 8, 128, False), (8, 16, 256, False),
        (8, 32, 128, False), (8, 4, 256, False), (64, 16, 128, False), (8, 8, 128, True),
        (8, 16, 256, True), (8, 32, 256, True), (8, 32, 256, False), (64, 32, 64, False)]],
    *[("tiny-bert", r, b, t, c) for r, b, t, c in [
        (8, 1, 32, False), (8, 8, 64, False), (8, 8, 128, False), (8, 16, 256, False),
        (8, 32, 128, False), (64, 16, 128, False), (8, 16, 256, True), (8, 32, 256, True)]],
    (SMOLLM, 8, 1, 32, True), (SMOLLM, 8, 1, 64, False), (SMOLLM, 8, 2, 128, False),
    (SMOLLM, 8, 2, 128, True),
    (MINILM, 8, 1, 32, False), (MINILM, 8, 8, 128, False), (MINILM, 8, 16, 128, False),
    (MINILM, 8, 4, 256, True),
]
"""Small plans the coefficients are fitted to; none of them is in HELD_OUT."""

HELD_OUT: list[Point] = [
    (SMOLLM, 8, 4, 64, False), (SMOLLM, 8, 4, 128, False), (SMOLLM, 8, 4, 128, True),
    (SMOLLM, 8, 8, 128, False), (SMOLLM, 32, 8, 128, False), (SMOLLM, 8, 4, 256, False),
    (SMOLLM, 64, 2, 256, False), (SMOLLM, 8, 8, 256, False), (SMOLLM, 8, 8, 256, True),
    (SMOLLM, 16, 1, 512, False), (SMOLLM, 8, 2, 512, True),
    (MINILM, 8, 32, 128, False), (MINILM, 8, 8, 256, False), (MINILM, 16, 16, 64, False),
    (MINILM, 8, 32, 256, True), (MINILM, 64, 4, 512, False), (MINILM, 8, 16, 512, True),
]
"""Plans the accuracy table reports: larger batches and sequences, other ranks."""

QUICK_CALIBRATION: list[Point] = [p for p in CALIBRATION if p[0].startswith("tiny")][::3]
QUICK_HELD_OUT: list[Point] = [("tiny-llama", 16, 16, 128, False), ("tiny-llama", 8, 32, 256, True),
                               ("tiny-bert", 8, 16, 128, False), ("tiny-bert", 8, 16, 256, True)]

OVERHEAD: list[Point] = [(SMOLLM, 8, 4, 128, False), (MINILM, 8, 16, 128, False)]
QUICK_OVERHEAD: list[Point] = [("tiny-llama", 8, 16, 256, False)]

NAIVE = {"batch": 8, "seq_len": 256, "rank": 8}  # the workload of the headline
ACCUMULATING_STEPS = 2  # optimiser steps of a verifying run (each of grad_accum micro-batches)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------

_DIMS: dict[str, ModelDims] = {}


def dims_of(model: str) -> ModelDims:
    """The planner's view of a built-in model, with the default LoRA targets."""
    if model not in _DIMS:
        from pollinate.methods.settings import DEFAULT_TARGETS
        from pollinate.models import model_config

        config = model_config(model, TASKS[model])
        _DIMS[model] = model_dims(config, DEFAULT_TARGETS[config.model_type], name=model)
    return _DIMS[model]


def plan_of(point: Point) -> LoraPlan:
    _, rank, micro, seq_len, ckpt = point
    return LoraPlan("lora", micro, 1, seq_len, ckpt, rank=rank)


def estimate_of(dims: ModelDims, plan: Plan, task: str, estimator: LoraEstimator | None = None) -> Estimate:
    """LoRA's estimate of ``plan`` (as ``LoraMethod.estimate``), with the code's coefficients or
    ``estimator``'s."""
    assert isinstance(plan, LoraPlan), plan
    estimator = estimator or LoraEstimator()
    return estimator.estimate(dims, plan, task, width=plan.rank, trainable=dims.lora_params(plan.rank))


def measure(point: Point, grad_accum: int = 1, **options: Any) -> dict[str, Any]:
    """Measure one plan in a fresh process; the record also holds the plan's estimate."""
    model = point[0]
    plan = dataclasses.replace(plan_of(point), grad_accum=grad_accum)
    start = time.perf_counter()
    m = measure_peak(model, TASKS[model], plan, **options)
    estimate = estimate_of(dims_of(model), plan, TASKS[model])
    record = {"model": model, "task": TASKS[model], **dataclasses.asdict(plan), **options,
              "peak": m.peak, "loaded": m.loaded, "baseline": m.baseline, "train_seconds": m.seconds,
              "cpu_seconds": m.cpu_seconds, "minor_faults": m.minor_faults,
              "wall_seconds": time.perf_counter() - start, "estimate": estimate.total,
              "estimate_parts": estimate.parts, "error": estimate.total / m.peak - 1}
    print(f"   {model:>22} {plan.describe():<45} {format_size(m.peak):>9} measured, "
          f"{format_size(estimate.total):>9} estimated ({record['error']:+.1%}) "
          f"{record['wall_seconds']:.0f}s", flush=True)
    return record


Job = tuple[Point, dict[str, Any]]


def measure_jobs(jobs: Sequence[Job], workers: int) -> list[dict[str, Any]]:
    """Measure ``(point, options)`` jobs, ``workers`` processes at a time, largest batches first;
    the records come back in input order."""
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0][2] * jobs[i][0][3])
    with ThreadPoolExecutor(workers) as pool:
        done = dict(zip(order, pool.map(lambda i: measure(jobs[i][0], **jobs[i][1]), order), strict=True))
    return [done[i] for i in range(len(jobs))]


def measure_all(points: Sequence[Point], workers: int) -> list[dict[str, Any]]:
    """Measure ``points`` with the default options (``train_local``, heap limited)."""
    return measure_jobs([(p, {}) for p in points], workers)


# --------------------------------------------------------------------------------------------------
# 0. Calibration
# --------------------------------------------------------------------------------------------------


def _features(record: dict[str, Any]) -> tuple[float, list[float]]:
    """The theory-only part of a record's peak, and the regressors of the calibrated coefficients."""
    zero = Calibration(decoder_workspace=0.0, encoder_workspace=0.0, logit_copies=0.0,
                       runtime_bytes=0, runtime_per_vocab=0.0)
    one = dataclasses.replace(zero, decoder_workspace=1.0, encoder_workspace=1.0, logit_copies=1.0)
    dims, plan = dims_of(record["model"]), plan_of(_point(record))
    base = estimate_of(dims, plan, record["task"], LoraEstimator(zero))
    unit = estimate_of(dims, plan, record["task"], LoraEstimator(one)).parts
    workspace = unit.get("workspace", 0)
    return base.total, [0.0 if dims.encoder else workspace, workspace if dims.encoder else 0.0,
                        unit.get("logits", 0), 1.0, float(dims.vocab)]


def _point(record: dict[str, Any]) -> Point:
    return (record["model"], record["rank"], record["micro_batch"], record["seq_len"],
            record["checkpointing"])


def fit(records: Sequence[dict[str, Any]]) -> Calibration:
    """Least squares on relative error: the coefficients that best explain the measured peaks.

    A coefficient the records cannot tell apart (no encoder among them, a single vocabulary size) keeps
    its default value.
    """
    defaults = Calibration()
    names = ["decoder_workspace", "encoder_workspace", "logit_copies", "runtime_bytes", "runtime_per_vocab"]
    rows, targets = [], []
    for record in records:
        theory, features = _features(record)
        rows.append(features)
        targets.append(record["peak"] - theory)
    x, y = np.array(rows), np.array(targets)
    weight = 1.0 / np.array([r["peak"] for r in records])  # every plan counts by its relative error
    values = {n: float(getattr(defaults, n)) for n in names}
    # a regressor that hardly varies (two tiny vocabularies of 259 and 261) cannot be told from the constant
    free = [j for j in range(len(names))
            if np.ptp(x[:, j]) > 0.5 * np.abs(x[:, j]).max() or names[j] == "runtime_bytes"]
    while free:  # no coefficient is negative: fix one that comes out below zero at 0 and fit again
        rest = y - sum((x[:, j] * values[names[j]] for j in range(len(names)) if j not in free),
                       np.zeros(len(y)))
        coef, *_ = np.linalg.lstsq(x[:, free] * weight[:, None], rest * weight, rcond=None)
        values.update({names[j]: float(c) for j, c in zip(free, coef, strict=True)})
        negative = [j for j, c in zip(free, coef, strict=True) if c < 0]
        if not negative:
            break
        values[names[negative[0]]] = 0.0
        free.remove(negative[0])
    return Calibration(decoder_workspace=round(values["decoder_workspace"], 3),
                       encoder_workspace=round(values["encoder_workspace"], 3),
                       logit_copies=round(values["logit_copies"], 3),
                       runtime_bytes=int(values["runtime_bytes"]),
                       runtime_per_vocab=round(values["runtime_per_vocab"], 1))


def errors_with(calibration: Calibration, records: Sequence[dict[str, Any]]) -> list[float]:
    """Relative error of every record's estimate under ``calibration``."""
    estimator = LoraEstimator(calibration)
    return [estimate_of(dims_of(r["model"]), plan_of(_point(r)), r["task"], estimator).total
            / r["peak"] - 1 for r in records]


# --------------------------------------------------------------------------------------------------
# 3. The smallest budget
# --------------------------------------------------------------------------------------------------


def minimum_plans(model: str) -> dict[str, dict[str, Any]]:
    """The planner's minimum budgets for the NAIVE request: keeping its 256 tokens, and with any plan;
    each with the plan ``choose_plan`` picks at exactly that budget."""
    dims, task = dims_of(model), TASKS[model]
    plans = lora_candidates(dims, [NAIVE["rank"]], NAIVE["batch"], NAIVE["seq_len"])
    same = min((p for p in plans if p.seq_len == NAIVE["seq_len"]),
               key=lambda p: estimate_of(dims, p, task).total)
    anything = min(plans, key=lambda p: estimate_of(dims, p, task).total)
    out = {}
    for label, plan in (("same_workload", same), ("any_plan", anything)):
        budget = minimum_budget(estimate_of(dims, plan, task), MARGIN)
        chosen, estimate = choose_plan(plans, lambda p: estimate_of(dims, p, task), budget,
                                       margin=MARGIN, model=model, title="LoRA")
        out[label] = {"budget": budget, "plan": dataclasses.asdict(chosen), "estimate": estimate.total}
    return out


def smallest_budgets(workers: int, quick: bool) -> dict[str, Any]:
    """The planner's minimum budgets for SmolLM2 (same workload, and any plan), each verified by a run."""
    model = "tiny-llama" if quick else SMOLLM
    out: dict[str, Any] = {"model": model, **minimum_plans(model)}
    naive: Point = (model, NAIVE["rank"], NAIVE["batch"], NAIVE["seq_len"], False)
    jobs: list[Job] = [(naive, {"bare": True, "limit_heap": False})]
    for label in ("same_workload", "any_plan"):  # the chosen plan as the client runs it: accumulating
        plan = LoraPlan(**out[label]["plan"])
        jobs.append(((model, plan.rank, plan.micro_batch, plan.seq_len, plan.checkpointing),
                     {"grad_accum": plan.grad_accum, "steps": ACCUMULATING_STEPS}))
    naive_record, *records = measure_jobs(jobs, workers)
    out["naive"] = {"plan": "batch 8 x 256 tokens, no checkpointing, bare loop, default allocator",
                    "peak": naive_record["peak"]}
    for label, record in zip(("same_workload", "any_plan"), records, strict=True):
        out[label]["measured"] = record["peak"]
    judge_minimum(out)
    return out


def judge_minimum(out: dict[str, Any]) -> None:
    """Whether each verified run stayed under its budget, and the headline ratios."""
    for label in ("same_workload", "any_plan"):
        entry = out[label]
        entry["fits"] = entry["measured"] <= entry["budget"]
        entry["ratio"] = out["naive"]["peak"] / entry["budget"]


def refresh_minimum(out: dict[str, Any]) -> None:
    """Recompute the minimum budgets with the current coefficients. A measured run still verifies
    its budget when the plan chosen at the new budget is the plan that ran; otherwise rerun."""
    for label, fresh in minimum_plans(out["model"]).items():
        if fresh["plan"] != out[label]["plan"]:
            raise SystemExit(f"the {label} plan changed with the coefficients: "
                             "rerun with --only minimum")
        out[label].update(fresh)
    judge_minimum(out)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _plan_cells(r: dict[str, Any]) -> list[Any]:
    return [r["model"], r["rank"], r["micro_batch"], r["seq_len"], "yes" if r["checkpointing"] else "no"]


def accuracy_section(records: Sequence[dict[str, Any]], quick: bool) -> tuple[str, bool | None]:
    worst = max(abs(r["error"]) for r in records)
    met = None if quick else worst <= ACCURACY_GOAL
    rows = [[*_plan_cells(r), format_size(r["estimate"]), format_size(r["peak"]), f"{r['error']:+.1%}"]
            for r in records]
    text = table(["model", "rank", "micro-batch", "seq len", "checkpointing", "estimate", "measured",
                  "error"], rows)
    return (f"{text}\n\nWorst error {worst:.1%}; goal ±{ACCURACY_GOAL:.0%}: {mark(met)}.", met)


def overhead_section(pairs: Sequence[dict[str, Any]], quick: bool) -> tuple[str, bool | None]:
    rows, worst = [], 0.0
    for p in pairs:
        ours, bare, default = p["ours"], p["bare"], p["bare_default_allocator"]
        ratio = ours["peak"] / bare["peak"]
        worst = max(worst, ratio)
        rows.append([*_plan_cells(ours), format_size(ours["peak"]), format_size(bare["peak"]),
                     f"{ratio:.3f}", format_size(default["peak"]), f"{ours['peak'] / default['peak']:.2f}"])
    met = None if quick else worst <= OVERHEAD_GOAL
    text = table(["model", "rank", "micro-batch", "seq len", "checkpointing", "train_local",
                  "bare loop", "ratio", "bare loop, default heap", "ratio"], rows)
    cost = [[*_plan_cells(p["ours"])[:1], *(
        f"{r['cpu_seconds'] / 3:.2f} s, {r['minor_faults'] / 3 / 1000:.0f}k" if "cpu_seconds" in r else "-"
        for r in (p["ours"], p["bare"], p["bare_default_allocator"]))] for p in pairs]
    cost_text = table(["model", "train_local", "bare loop", "bare loop, default heap"], cost)
    return (f"{text}\n\nWorst ratio {worst:.3f}; goal ≤ {OVERHEAD_GOAL}: {mark(met)}.\n\n"
            "What the heap setting costs: CPU time (user + system) per step and page faults per step "
            f"(CPU time barely depends on other load, unlike wall time):\n\n{cost_text}", met)


def minimum_section(m: dict[str, Any]) -> str:
    rows = []
    for label, title in (("same_workload", "same workload (256 tokens, effective batch 8)"),
                         ("any_plan", "any plan (sequence cap down to 16)")):
        e = m[label]
        plan = LoraPlan(**e["plan"])
        rows.append([title, format_size(e["budget"]), plan.describe(), format_size(e["measured"]),
                     "yes" if e["fits"] else "**no**", f"{e['ratio']:.2f}x"])
    text = table(["pollinate minimum", "budget", "plan chosen at it", "measured peak", "under budget",
                  "naive peak / budget"], rows)
    return (f"Naive setup ({m['naive']['plan']}): peak {format_size(m['naive']['peak'])}.\n\n{text}")


def calibration_section(cal: dict[str, Any], defaults: dict[str, Any]) -> str:
    rows = [[name, cal["fitted"][name], defaults[name]] for name in defaults]
    text = table(["coefficient", "fitted", "in the code"], rows)
    return (f"Fitted on {len(cal['records'])} small plans (tiny-llama, tiny-bert, and SmolLM2 / MiniLM "
            f"up to 256 tokens a batch), relative least squares, no coefficient below zero:\n\n{text}\n\n"
            f"Worst error on the calibration set: {cal['worst_fitted']:.1%} with the fitted values, "
            f"{cal['worst_defaults']:.1%} with the code's.")


def write_doc(result: dict[str, Any]) -> list[str]:
    """Write the markdown report; returns its section texts."""
    quick = result["quick"]
    texts = []
    head = [
        "# Memory budgets: estimator accuracy, overhead, smallest budget",
        "",
        f"Written by `python benchmarks/memory.py{' --quick' if quick else ''}`; figures from "
        f"`benchmarks/results/{NAME}{'.quick' if quick else ''}.json`. A peak is VmHWM after three "
        "training steps minus VmHWM before the model was loaded (interpreter, torch, transformers, "
        "peft), in a fresh process with one torch thread, every weight resident, glibc's heap set by "
        "`limit_heap_retention()`; two measurements at a time. Estimates use the coefficients in "
        "`pollinate/methods/lora/memory.py`.",
        "",
        "Measured on " + "; ".join(
            f"{name}: {run['finished']}, {run['seconds']:.0f} s, load average {run['loadavg_start']:.1f}"
            f" -> {run['loadavg_end']:.1f} on {result['machine']['cpus']} cores"
            for name, run in result.get("runs", {}).items()) + ".",
    ]
    body: list[str] = []
    if "accuracy" in result:
        text, met = accuracy_section(result["accuracy"]["records"], quick)
        result["accuracy"]["met"] = met
        texts.append(text)
        body += ["", "## 1. Estimator accuracy (held-out plans)", "", text]
    if "overhead" in result:
        text, met = overhead_section(result["overhead"]["pairs"], quick)
        result["overhead"]["met"] = met
        texts.append(text)
        body += ["", "## 2. Overhead of the training step", "",
                 "`train_local` against a bare torch + peft loop (one padded batch, forward, backward, "
                 "AdamW) at the same plan and allocator setting. The last two columns compare with a "
                 "bare loop on glibc's default heap: what `limit_heap_retention()` saves.", "", text]
    if "minimum" in result:
        text = minimum_section(result["minimum"])
        texts.append(text)
        body += ["", "## 3. Smallest budget that still trains SmolLM2", "",
                 "The planner's minimum budget (estimate / 0.9 safety margin) for the request batch 8, "
                 "256 tokens, rank 8; then the plan `choose_plan` picks at exactly that budget, run for "
                 f"real through `train_local` ({ACCUMULATING_STEPS} optimiser steps, each accumulating "
                 "over its micro-batches): its measured peak must stay under the budget.", "", text]
    if "dtype" in result:
        text = dtype_section(result["dtype"])
        texts.append(text)
        body += ["", "## Frozen base in bfloat16 (measured, not planned)", "", text]
    if "calibration" in result:
        text = calibration_section(result["calibration"], result["defaults"])
        texts.append(text)
        body += ["", "## Calibration", "", text]
    path = DOC if not quick else RESULTS / "benchmarks-memory.quick.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head + body) + "\n")
    print(f"wrote {path}")
    return texts


SECTIONS = ("calibration", "accuracy", "overhead", "minimum", "dtype")
DTYPE_POINT: Point = (SMOLLM, 8, 2, 128, False)
QUICK_DTYPE_POINT: Point = ("tiny-llama", 8, 16, 256, False)


def run_section(name: str, quick: bool, workers: int) -> dict[str, Any]:
    """Measure one section; returns what goes into the results under its name."""
    print(f"== {name}", flush=True)
    if name == "calibration":
        records = measure_all(QUICK_CALIBRATION if quick else CALIBRATION, workers)
        fitted = fit(records)
        print(f"   fitted: {fitted}", flush=True)
        return {"records": records, "fitted": dataclasses.asdict(fitted),
                "worst_fitted": max(abs(e) for e in errors_with(fitted, records))}
    if name == "accuracy":
        return {"records": measure_all(QUICK_HELD_OUT if quick else HELD_OUT, workers)}
    if name == "overhead":
        points = QUICK_OVERHEAD if quick else OVERHEAD
        variants = ({}, {"bare": True}, {"bare": True, "limit_heap": False})
        flat = measure_jobs([(p, v) for p in points for v in variants], workers)
        return {"pairs": [dict(zip(("ours", "bare", "bare_default_allocator"), flat[i:i + 3], strict=True))
                          for i in range(0, len(flat), 3)]}
    if name == "dtype":
        point = QUICK_DTYPE_POINT if quick else DTYPE_POINT
        fp32, bf16 = measure_jobs([(point, {}), (point, {"base_dtype": "bfloat16"})], workers)
        return {"float32": fp32, "bfloat16": bf16}
    return smallest_budgets(workers, quick)


def dtype_section(d: dict[str, Any]) -> str:
    rows = [[name, *_plan_cells(r)[:5], format_size(r["peak"]), f"{r['train_seconds'] / 3:.2f}"]
            for name, r in d.items()]
    text = table(["frozen base", "model", "rank", "micro-batch", "seq len", "checkpointing", "peak",
                  "s / step"], rows)
    return (f"{text}\n\nBoth ran at the same time on the same machine (timings comparable with each "
            "other only). Not offered by the planner: clients must hold a bit-identical fp32 base (the "
            "base fingerprint check; FedEx-LoRA and base-delta sync merge into it), and the speed-up needs "
            "a CPU with bf16 instructions (this one has avx512_bf16; without them bf16 matmuls are slow).")


def refresh_estimates(result: dict[str, Any]) -> None:
    """Recompute every estimate with the code's current coefficients (the measurements stay)."""
    for section in ("calibration", "accuracy"):
        for r in result.get(section, {}).get("records", []):
            estimate = estimate_of(dims_of(r["model"]), plan_of(_point(r)), r["task"])
            r["estimate"], r["estimate_parts"] = estimate.total, estimate.parts
            r["error"] = estimate.total / r["peak"] - 1
    if "minimum" in result:
        refresh_minimum(result["minimum"])
    if "calibration" in result:
        result["calibration"]["worst_defaults"] = max(
            abs(r["error"]) for r in result["calibration"]["records"])
    result["defaults"] = dataclasses.asdict(Calibration())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models only (a minute)")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="skip measuring the calibration set and fitting the coefficients")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="measure only this section (repeatable); the others are kept from the "
                             "last results file, their estimates recomputed with the current code")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: recompute the estimates of the last results file with "
                             "the current code and rewrite the report")
    parser.add_argument("--workers", type=int, default=2, help="measurements at a time")
    args = parser.parse_args()
    path = RESULTS / f"{NAME}{'.quick' if args.quick else ''}.json"
    sections = args.only or [s for s in SECTIONS if args.calibrate or s != "calibration"]
    if args.report_only:
        sections = []
    keep = (args.only or args.report_only) and path.is_file()
    result: dict[str, Any] = json.loads(path.read_text()) if keep else {}
    result.update({"name": NAME, "quick": args.quick})
    if sections:
        result["machine"] = machine()
    runs = result.setdefault("runs", {})
    for name in sections:
        load, start = os.getloadavg()[0], time.perf_counter()
        result[name] = run_section(name, args.quick, args.workers)
        runs[name] = {"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "seconds": time.perf_counter() - start, "loadavg_start": load,
                      "loadavg_end": os.getloadavg()[0]}
    refresh_estimates(result)
    texts = write_doc(result)
    print(f"wrote {save_result(NAME, result)}")
    print("\n\n".join(texts))


if __name__ == "__main__":
    main()
