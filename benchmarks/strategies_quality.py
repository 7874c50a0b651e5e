"""What each aggregation strategy learns: held-out accuracy and loss per round, against centralized LoRA.

MiniLM-L6 sentiment classification on Rotten Tomatoes (SmolLM2 would take too long for six federations
on 2 CPU cores), 10 clients with label-skewed Dirichlet(0.5) shares, the same rounds, local steps,
batch, lr and seeds for every run (each run is repeated for every seed in ``--seeds``, default 0 to 4;
a seed draws the held-out split, the client shares, the classifier head, the initial adapter and the
batches, and the tables give the mean and the spread):

* fedit, ffa, fedex (equal ranks required) at rank 8 on every client;
* flora and zeropad with heterogeneous ranks 16,16,8,8,8,4,4,4,2,2 (mean 7.2);
* flora at rank 8 as well, so that it compares with fedit/ffa/fedex like for like;
* centralized LoRA (rank 8, same base, same seeded initial adapter) trained by ``train_local`` on the
  union of the 10 shares for rounds x local-steps x clients steps of the same batch: the same total
  examples. It trains in ``rounds`` chunks of local-steps x clients steps (a fresh AdamW each chunk,
  as every federated round restarts the clients' optimisers) and is evaluated after each chunk.

Everything is evaluated by ``GlobalModel.evaluate`` on the same held-out split no client sees.

    python benchmarks/strategies_quality.py [--quick] [--seeds 0,1,2,3,4]

Each finished federation is kept in ``benchmarks/results/strategies_quality.partial.json`` until the
whole benchmark is done, so an interrupted run picks up where it stopped.

Also hosts :func:`update_doc`, which rebuilds docs/benchmarks-strategies.md from the results of the three
strategy benchmarks (strategies_quality, aggregation_cost, strategies_bytes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import (
    REPO,
    RESULTS,
    CpuMeter,
    events_of,
    machine,
    read_events,
    read_summary,
    run_simulate,
    save_result,
    table,
)

NAME = "strategies_quality"
DOC = REPO / "docs" / "benchmarks-strategies.md"
PLOT = REPO / "docs" / "strategies-quality.png"
HETERO = "16,16,8,8,8,4,4,4,2,2"  # one rank per client: two large devices, three medium, five small
UNIFORM = 8

BASE: dict[str, Any] = {
    "model": "minilm-l6", "task": "classification", "dataset": "rotten-tomatoes",
    "partitioner": "dirichlet", "dirichlet-alpha": 0.5,  # every client keeps >= 273 examples at 0.5
    # 4 x 10 steps x batch 16 keeps the six federations + the reference near 15 min on 2 cores; lr 2e-3 as
    # in configs/minilm-rotten-tomatoes.toml (at 5e-3 even centralized training collapses to one class)
    "num-clients": 10, "rounds": 4, "local-steps": 10, "batch-size": 16, "max-seq-len": 64,
    "lr": 0.002, "eval-examples": 500, "lora.alpha": 16.0, "sim.workers": 2,
}
SEEDS = "0,1,2,3,4"
QUICK: dict[str, Any] = {
    **BASE, "model": "tiny-bert", "num-clients": 3, "rounds": 2, "local-steps": 2, "batch-size": 4,
    "max-seq-len": 32, "eval-examples": 32,
}
QUICK_HETERO = "8,4,2"
QUICK_UNIFORM = 4

# (label, strategy, ranks or None for the uniform rank)
RUNS = (("fedit", "fedit", None), ("ffa", "ffa", None), ("fedex", "fedex", None),
        ("flora (uniform)", "flora", None), ("flora (hetero)", "flora", "hetero"),
        ("zeropad (hetero)", "zeropad", "hetero"))
EXACT = ("ffa", "fedex", "flora")


def settings_for(base: dict[str, Any], strategy: str, ranks: str | None, uniform: int) -> dict[str, Any]:
    """One run's keys: the shared ones plus its strategy and ranks."""
    out = {**base, "strategy": strategy, "lora.rank": uniform}
    if ranks is not None:
        out["lora.ranks"] = ranks
    return out


def federated(settings: dict[str, Any]) -> dict[str, Any]:
    """One federation in its own process: eval per round, bytes, wall time."""
    with tempfile.TemporaryDirectory(prefix="pollinate-quality-") as tmp:
        run = run_simulate(settings, Path(tmp))
        events, summary = read_events(run["run_dir"]), read_summary(run["run_dir"])
    evals = events_of(events, "evaluate")
    return {"settings": settings, "wall_seconds": run["wall_seconds"], "busy_cores": run["busy_cores"],
            "eval_by_round": {r: {"loss": e["loss"], "accuracy": e["accuracy"]}
                              for r, e in sorted(evals.items())},
            "train_loss_by_round": {r: e["train_loss"]
                                    for r, e in sorted(events_of(events, "train").items())},
            "bytes_up_total": summary["bytes_up_total"], "bytes_down_total": summary["bytes_down_total"],
            "rejected": summary["rejected_updates"]}


def centralized(settings: dict[str, Any]) -> dict[str, Any]:
    """One rank-``lora.rank`` model on the union of the shares, evaluated after each round's worth."""
    from pollinate import workload  # imported here: the federated runs above start clean
    from pollinate.config import RunConfig
    from pollinate.data import encode_dataset
    from pollinate.server.global_model import GlobalModel
    from pollinate.strategies import method_for
    from pollinate.training import train_local

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes
    cfg = RunConfig.from_run_config(settings)
    meter, start = CpuMeter(), time.perf_counter()
    model = GlobalModel(cfg, method_for(cfg))  # same base, seeded initial adapter, held-out split
    union = [e for share in workload.shares(cfg, model.method.calibration_size())
             for e in encode_dataset(share, model.tokenizer, cfg.task, cfg.max_seq_len)]
    evals = {0: model.evaluate()}
    chunk = cfg.local_steps * cfg.num_clients  # the examples all clients see in one round
    seen = 0
    for r in range(1, cfg.rounds + 1):
        result = train_local(model.model, union, steps=chunk, batch_size=cfg.batch_size, lr=cfg.lr,
                             pad_id=model.tokenizer.pad_token_id, seed=workload.round_seed(cfg, r))
        seen += result.examples
        evals[r] = model.evaluate()
    return {"settings": settings, "steps": chunk * cfg.rounds, "union_examples": len(union),
            "examples_seen": seen, "wall_seconds": time.perf_counter() - start,
            "busy_cores": meter.busy_cores(), "eval_by_round": evals}


def seeded(settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """``settings`` with its seed."""
    return {**settings, "seed": seed}


def repeat(label: str, settings: dict[str, Any], seeds: list[int], partial: dict[str, Any],
           run: Any) -> dict[str, Any]:
    """``run(settings)`` once per seed; finished seeds come from (and go to) the ``partial`` file."""
    per_seed = []
    for seed in seeds:
        key = f"{label}|{seed}"
        if key not in partial["done"]:
            partial["done"][key] = run(seeded(settings, seed))
            save_result(f"{NAME}.partial", partial)
        res = partial["done"][key]
        last = _final(res["eval_by_round"])
        print(f"{label} seed {seed}: accuracy {last['accuracy']:.3f}, loss {last['loss']:.3f} "
              f"({res['wall_seconds']:.0f} s)", flush=True)
        per_seed.append(res)
    return {"label": label, "settings": settings, "seeds": seeds, "per_seed": per_seed}


def curve(run: dict[str, Any], metric: str) -> dict[int, list[float]]:
    """Round -> the metric on every seed."""
    out: dict[int, list[float]] = {}
    for res in run["per_seed"]:
        for r, e in res["eval_by_round"].items():
            out.setdefault(int(r), []).append(e[metric])
    return dict(sorted(out.items()))


def finals(run: dict[str, Any], metric: str) -> list[float]:
    """The last round's metric on every seed."""
    return [_final(res["eval_by_round"])[metric] for res in run["per_seed"]]


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` (sd over seeds; just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def all_runs(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The federations, then the centralized reference labelled ``centralized``."""
    return [*out["runs"], {**out["centralized"], "label": "centralized"}]


def plot(out: dict[str, Any], path: Path) -> None:
    """Mean accuracy and loss per round over the seeds, one line per run (centralized dashed), the
    band spanning the seeds' lowest to highest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in all_runs(out):
        style = "--" if run["label"] == "centralized" else "-"
        for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
            points = curve(run, metric)
            rounds = list(points)
            line, = ax.plot(rounds, [statistics.mean(v) for v in points.values()], style, marker="o",
                            markersize=3, label=run["label"])
            if len(out["seeds"]) > 1:
                ax.fill_between(rounds, [min(v) for v in points.values()],
                                [max(v) for v in points.values()], color=line.get_color(), alpha=0.12)
    for ax, metric in zip(axes, ("held-out accuracy", "held-out loss"), strict=True):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = out["base"]
    fig.suptitle(f"{s['model']} on {s['dataset']}, {s['num-clients']} clients, "
                 f"Dirichlet({s['dirichlet-alpha']}), {s['local-steps']} steps x batch {s['batch-size']} "
                 f"per round; mean over seeds {', '.join(map(str, out['seeds']))} (band: min to max)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _final(evals: dict[Any, dict[str, float]]) -> dict[str, float]:
    return evals[max(evals, key=int)]


def report(out: dict[str, Any]) -> str:
    """Final accuracy and loss per run, mean ± sd over the seeds."""
    rows = []
    for run in all_runs(out):
        central = run["label"] == "centralized"
        s = run["settings"]
        ranks = s["lora.rank"] if central else (s.get("lora.ranks") or f"{s['lora.rank']} on every client")
        first = run["per_seed"][0]
        best = [max(e["accuracy"] for e in res["eval_by_round"].values()) for res in run["per_seed"]]
        rows.append([f"centralized ({first['steps']} steps)" if central else run["label"],
                     "-" if central else ("yes" if s["strategy"] in EXACT else "no"), ranks,
                     mean_sd(finals(run, "accuracy")),
                     " ".join(f"{a:.3f}" for a in finals(run, "accuracy")),
                     mean_sd(finals(run, "loss")), mean_sd(best),
                     "-" if central else
                     f"{first['bytes_up_total'] / 1e6:.1f} / {first['bytes_down_total'] / 1e6:.1f}",
                     f"{statistics.mean(r['wall_seconds'] for r in run['per_seed']):.0f}"])
    start = curve(out["centralized"], "accuracy")[0], curve(out["centralized"], "loss")[0]
    return (table(["run", "exact", "ranks", "final accuracy", "per seed", "final loss", "best accuracy",
                   "MB up / down (all clients, seed 0)", "wall s (mean)"], rows)
            + f"\n\nBefore training (round 0): accuracy {mean_sd(start[0])}, loss {mean_sd(start[1])}.")


def compare(out: dict[str, Any], label: str, against: str) -> str:
    """``label`` against ``against``: the difference of the mean final accuracy and loss, and on how
    many seeds ``label`` ends with the higher accuracy."""
    runs = {r["label"]: r for r in out["runs"]}
    acc = [finals(runs[x], "accuracy") for x in (label, against)]
    loss = [finals(runs[x], "loss") for x in (label, against)]
    d_acc = statistics.mean(acc[0]) - statistics.mean(acc[1])
    d_loss = statistics.mean(loss[0]) - statistics.mean(loss[1])
    wins = sum(a > b for a, b in zip(*acc, strict=True))
    verdict = (f"beats {against}" if d_acc > 0 and d_loss < 0 and wins == len(acc[0]) else
               f"is ahead of {against} on average, not on every seed" if d_acc > 0 else
               f"does not beat {against}")
    return (f"{label} {verdict}: mean accuracy {d_acc:+.3f}, mean loss {d_loss:+.3f}; "
            f"higher accuracy on {wins} of {len(acc[0])} seeds.")


def findings(out: dict[str, Any]) -> list[str]:
    """The expectations, judged on the final round over the seeds."""
    lines = [f"- {compare(out, label, 'fedit')}" for label in ("ffa", "fedex", "flora (uniform)")]
    lines.append(f"- With heterogeneous ranks: {compare(out, 'flora (hetero)', 'zeropad (hetero)')}")
    means = {r["label"]: statistics.mean(finals(r, "accuracy")) for r in out["runs"]}
    best = max(means, key=lambda k: means[k])
    cen = statistics.mean(finals(out["centralized"], "accuracy"))
    lines.append(f"- Best federated run: {best} ({means[best]:.3f} mean); centralized reaches "
                 f"{cen:.3f} (gap {means[best] - cen:+.3f}).")
    return lines


def section(out: dict[str, Any]) -> list[str]:
    """The quality section of docs/benchmarks-strategies.md."""
    s, central = out["base"], out["centralized"]["per_seed"][0]
    hetero = out["hetero_ranks"]
    lines = [
        "## Quality (`benchmarks/strategies_quality.py`)", "",
        f"`{s['model']}` ({s['task']}) on `{s['dataset']}`, {s['num-clients']} clients with label-skewed "
        f"Dirichlet({s['dirichlet-alpha']}) shares, {s['rounds']} rounds x {s['local-steps']} local steps x "
        f"batch {s['batch-size']} (max-seq-len {s['max-seq-len']}), lr {s['lr']}, each run repeated with "
        f"seeds {', '.join(map(str, out['seeds']))} (a seed draws the held-out split, the shares, the new "
        "classifier head, the initial adapter and the batches; figures are mean ± sd over the seeds), "
        f"LoRA alpha {s['lora.alpha']} on the attention query/key/value, held-out split of "
        f"{s['eval-examples']} examples no client sees, evaluated by the server after every round. "
        f"fedit, ffa and fedex need equal ranks: rank {out['uniform_rank']} on every client; flora and "
        f"zeropad run with heterogeneous ranks `{hetero}`, and flora also at rank {out['uniform_rank']} for "
        "a like-for-like comparison. The centralized reference trains one rank-"
        f"{out['uniform_rank']} model (same base, same seeded initial adapter) with `train_local` on the "
        f"union of the shares ({central['union_examples']} examples at seed {out['seeds'][0]}) for "
        f"{central['steps']} steps of the same batch - the examples all clients see together - "
        "in one chunk per round (fresh AdamW each chunk, like the clients), evaluated after each chunk. "
        "SmolLM2 generation would take too long for six federations on 2 CPU cores, so the "
        "comparison runs on MiniLM.", "",
        report(out), "",
        "![accuracy and loss per round](strategies-quality.png)", "",
        "Per round (mean accuracy / mean loss over the seeds):", "",
    ]
    rows = []
    for run in all_runs(out):
        acc, loss = curve(run, "accuracy"), curve(run, "loss")
        rows.append([run["label"], *[f"{statistics.mean(acc[r]):.3f} / {statistics.mean(loss[r]):.3f}"
                                     for r in acc]])
    rounds = list(curve(out["centralized"], "accuracy"))
    lines += [table(["run", *[f"round {r}" for r in rounds]], rows), ""]
    lines += ["Findings (final round):", "", *findings(out), ""]
    lines += lr_checks(bool(out["quick"]))
    if out.get("notes"):
        lines += [out["notes"], ""]
    lines += [f"The runs took {out['wall_seconds'] / 60:.1f} min in all "
              f"(machine: {out['machine']['cpus']} CPUs, busy cores during the first centralized run "
              f"{central['busy_cores']:.2f}).", ""]
    return lines


SCRIPTS = (("strategies_quality", "Quality"), ("aggregation_cost", "Aggregation cost"),
           ("strategies_bytes", "Bytes on the wire"))


def update_doc(quick: bool) -> Path:
    """Rebuild docs/benchmarks-strategies.md from the three results files (quick runs write a copy under
    benchmarks/results/ instead, so smoke figures never reach docs/)."""
    import json

    lines = ["# Aggregation strategies: benchmarks", "",
             "Every figure below is read from `benchmarks/results/<name>.json`, written by the script "
             "named in its section; rerun one with `.venv/bin/python benchmarks/<name>.py` (add `--quick` "
             "for a smoke test) and the section is rebuilt. Machine: 2 CPU cores, no GPU.", ""]
    for name, title in SCRIPTS:
        path = RESULTS / f"{name}{'.quick' if quick else ''}.json"
        if not path.exists():
            lines += [f"## {title} (`benchmarks/{name}.py`)", "",
                      f"_Not run yet: `python benchmarks/{name}.py`._", ""]
            continue
        module = importlib.import_module(name)
        lines += module.section(json.loads(path.read_text()))
    target = RESULTS / "benchmarks-strategies.quick.md" if quick else DOC
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines).rstrip() + "\n")
    return target


def lr_check(args: argparse.Namespace, base: dict[str, Any], hetero: str, uniform: int,
             start: float) -> None:
    """The same federations at another learning rate (a sensitivity check of the main comparison)."""
    wanted = [label.strip() for label in args.runs.split(",")]
    runs = []
    for label, strategy, ranks in RUNS:
        if label in wanted:
            settings = settings_for(base, strategy, hetero if ranks else None, uniform)
            res = {"label": label, **federated(settings)}
            last = _final(res["eval_by_round"])
            print(f"lr {base['lr']} {label}: accuracy {last['accuracy']:.3f}, loss {last['loss']:.3f} "
                  f"({res['wall_seconds']:.0f} s)", flush=True)
            runs.append(res)
    out = {"name": f"{NAME}-lr{base['lr']:g}", "quick": args.quick, "base": base, "runs": runs,
           "machine": machine(), "wall_seconds": time.perf_counter() - start}
    print(f"results: {save_result(out['name'], out)}")
    print(f"doc: {update_doc(args.quick)}")


def lr_checks(quick: bool) -> list[str]:
    """The learning-rate checks found beside the main results, as a table."""
    import json

    rows = []
    for path in sorted(RESULTS.glob(f"{NAME}-lr*.json")):
        if path.name.endswith(".quick.json") != quick:
            continue
        check = json.loads(path.read_text())
        runs = check["runs"] + ([{"label": "centralized", **check["centralized"]}]
                                if "centralized" in check else [])
        for r in runs:
            ev = r["eval_by_round"]
            rows.append([check["base"]["lr"], r["label"],
                         " -> ".join(f"{ev[k]['accuracy']:.3f}" for k in sorted(ev, key=int)),
                         " -> ".join(f"{ev[k]['loss']:.3f}" for k in sorted(ev, key=int)),
                         f"{r['wall_seconds']:.0f}"])
    if not rows:
        return []
    return ["Learning-rate check (`--lr`, seed 0 only; the lr 5e-3 file is the first full run of this "
            "script, made at that lr on a shared machine, so its wall times are inflated): the same "
            "federations, everything else equal; accuracy and loss from round 0 to the last:", "",
            table(["lr", "run", "accuracy by round", "loss by round", "wall s"], rows), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-bert, 3 clients, 2 rounds: a smoke test")
    parser.add_argument("--seeds", help=f"seeds to repeat every run with (default {SEEDS}; --quick: 0)")
    parser.add_argument("--docs-only", action="store_true", help="only rebuild the doc from the results")
    parser.add_argument("--lr", type=float, help="a learning-rate check: only the --runs federations at this "
                        "lr, first seed only, no reference, no plot; results in "
                        "strategies_quality-lr<LR>.json")
    parser.add_argument("--runs", default="fedit,ffa,fedex,flora (uniform)",
                        help="with --lr: the run labels to repeat, comma-separated")
    args = parser.parse_args()
    if args.docs_only:
        print(f"doc: {update_doc(args.quick)}")
        return
    start = time.perf_counter()
    base = QUICK if args.quick else BASE
    hetero, uniform = (QUICK_HETERO, QUICK_UNIFORM) if args.quick else (HETERO, UNIFORM)
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else SEEDS)).split(",")]
    if args.lr is not None:
        lr_check(args, seeded({**base, "lr": args.lr}, seeds[0]), hetero, uniform, start)
        return
    # finished federations of an interrupted run with the same settings are kept, not run again
    partial_path = RESULTS / f"{NAME}.partial{'.quick' if args.quick else ''}.json"
    partial = {"name": f"{NAME}.partial", "quick": args.quick, "base": base, "done": {}}
    if partial_path.exists() and json.loads(partial_path.read_text())["base"] == base:
        partial = json.loads(partial_path.read_text())
    runs = [repeat(label, settings_for(base, strategy, hetero if ranks else None, uniform), seeds, partial,
                   federated)
            for label, strategy, ranks in RUNS]
    cen = repeat("centralized", settings_for(base, "fedit", None, uniform), seeds, partial, centralized)
    out = {"name": NAME, "quick": args.quick, "base": base, "seeds": seeds, "uniform_rank": uniform,
           "hetero_ranks": hetero, "runs": runs, "centralized": cen, "machine": machine()}
    # every run's own wall time, those kept from an interrupted run included
    out["wall_seconds"] = sum(r["wall_seconds"] for run in all_runs(out) for r in run["per_seed"])
    plot(out, RESULTS / "strategies-quality.quick.png" if args.quick else PLOT)
    print(report(out))
    print("\n".join(findings(out)))
    print(f"results: {save_result(NAME, out)}")
    partial_path.unlink(missing_ok=True)
    print(f"doc: {update_doc(args.quick)}")


if __name__ == "__main__":
    main()
