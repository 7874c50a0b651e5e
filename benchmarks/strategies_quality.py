"""What each aggregation strategy learns: held-out accuracy and loss per round, against centralized LoRA.

MiniLM-L6 sentiment classification on Rotten Tomatoes (SmolLM2 would take too long for six federations
on 2 CPU cores), 10 clients with label-skewed Dirichlet(0.5) shares, the same rounds, local steps,
batch, lr and seed for every run:

* fedit, ffa, fedex (equal ranks required) at rank 8 on every client;
* flora and zeropad with heterogeneous ranks 16,16,8,8,8,4,4,4,2,2 (mean 7.2);
* flora at rank 8 as well, so that it compares with fedit/ffa/fedex like for like;
* centralized LoRA (rank 8, same base, same seeded initial adapter) trained by ``train_local`` on the
  union of the 10 shares for rounds x local-steps x clients steps of the same batch: the same total
  examples. It trains in ``rounds`` chunks of local-steps x clients steps (a fresh AdamW each chunk,
  as every federated round restarts the clients' optimisers) and is evaluated after each chunk.

Everything is evaluated by ``GlobalModel.evaluate`` on the same held-out split no client sees.

    python benchmarks/strategies_quality.py [--quick]

Also hosts :func:`update_doc`, which rebuilds docs/benchmarks-strategies.md from the results of the three
strategy benchmarks (strategies_quality, aggregation_cost, strategies_bytes).
"""

from __future__ import annotations

import argparse
import importlib
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
    "lr": 0.002, "seed": 0, "eval-examples": 500, "lora.alpha": 16.0, "sim.workers": 2,
}
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
    from pollinate.training import train_local

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes
    cfg = RunConfig.from_run_config(settings)
    meter, start = CpuMeter(), time.perf_counter()
    model = GlobalModel(cfg)  # same base, same seeded initial adapter, same held-out split
    union = [e for share in workload.shares(cfg)
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


def plot(out: dict[str, Any], path: Path) -> None:
    """Accuracy and loss per round, one line per run (centralized dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(r["label"], r["eval_by_round"], "-") for r in out["runs"]]
    series.append(("centralized", out["centralized"]["eval_by_round"], "--"))
    for label, evals, style in series:
        rounds = sorted(int(k) for k in evals)
        for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
            ax.plot(rounds, [evals[k][metric] if k in evals else evals[str(k)][metric] for k in rounds],
                    style, marker="o", label=label)
    for ax, metric in zip(axes, ("held-out accuracy", "held-out loss"), strict=True):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = out["base"]
    fig.suptitle(f"{s['model']} on {s['dataset']}, {s['num-clients']} clients, "
                 f"Dirichlet({s['dirichlet-alpha']}), {s['local-steps']} steps x batch {s['batch-size']} "
                 "per round", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _final(evals: dict[Any, dict[str, float]]) -> dict[str, float]:
    return evals[max(evals, key=int)]


def report(out: dict[str, Any]) -> str:
    """Final accuracy and loss per run."""
    rows = []
    for r in out["runs"]:
        last = _final(r["eval_by_round"])
        ranks = r["settings"].get("lora.ranks") or f"{r['settings']['lora.rank']} on every client"
        rows.append([r["label"], "yes" if r["settings"]["strategy"] in EXACT else "no", ranks,
                     f"{last['accuracy']:.3f}", f"{last['loss']:.3f}",
                     f"{max(e['accuracy'] for e in r['eval_by_round'].values()):.3f}",
                     f"{r['bytes_up_total'] / 1e6:.1f} / {r['bytes_down_total'] / 1e6:.1f}",
                     f"{r['wall_seconds']:.0f}"])
    c = out["centralized"]
    last = _final(c["eval_by_round"])
    rows.append([f"centralized ({c['steps']} steps)", "-", c["settings"]["lora.rank"],
                 f"{last['accuracy']:.3f}", f"{last['loss']:.3f}",
                 f"{max(e['accuracy'] for e in c['eval_by_round'].values()):.3f}", "-",
                 f"{c['wall_seconds']:.0f}"])
    start = out["centralized"]["eval_by_round"][min(c["eval_by_round"], key=int)]
    return (table(["run", "exact", "ranks", "final accuracy", "final loss", "best accuracy",
                   "MB up / down (all clients)", "wall s"], rows)
            + f"\n\nBefore training (round 0): accuracy {start['accuracy']:.3f}, loss {start['loss']:.3f}.")


def findings(out: dict[str, Any]) -> list[str]:
    """The expectations, judged on the final round."""
    final = {r["label"]: _final(r["eval_by_round"]) for r in out["runs"]}
    cen = _final(out["centralized"]["eval_by_round"])
    base = final["fedit"]
    lines = []
    for label in ("ffa", "fedex", "flora (uniform)"):
        d_acc, d_loss = final[label]["accuracy"] - base["accuracy"], final[label]["loss"] - base["loss"]
        verdict = "beats" if d_acc > 0 and d_loss < 0 else ("ties" if abs(d_acc) < 0.005 else "does not beat")
        lines.append(f"- {label} (exact) {verdict} fedit: accuracy {d_acc:+.3f}, loss {d_loss:+.3f}.")
    hz, hf = final["zeropad (hetero)"], final["flora (hetero)"]
    lines.append(f"- With heterogeneous ranks, flora (exact) vs zeropad (inexact): accuracy "
                 f"{hf['accuracy'] - hz['accuracy']:+.3f}, loss {hf['loss'] - hz['loss']:+.3f}.")
    best = max(final, key=lambda k: final[k]["accuracy"])
    lines.append(f"- Best federated run: {best} ({final[best]['accuracy']:.3f}); centralized reaches "
                 f"{cen['accuracy']:.3f} (gap {final[best]['accuracy'] - cen['accuracy']:+.3f}).")
    return lines


def section(out: dict[str, Any]) -> list[str]:
    """The quality section of docs/benchmarks-strategies.md."""
    s = out["base"]
    hetero = out["hetero_ranks"]
    lines = [
        "## Quality (`benchmarks/strategies_quality.py`)", "",
        f"`{s['model']}` ({s['task']}) on `{s['dataset']}`, {s['num-clients']} clients with label-skewed "
        f"Dirichlet({s['dirichlet-alpha']}) shares, {s['rounds']} rounds x {s['local-steps']} local steps x "
        f"batch {s['batch-size']} (max-seq-len {s['max-seq-len']}), lr {s['lr']}, seed {s['seed']}, "
        f"LoRA alpha {s['lora.alpha']} on the attention query/key/value, held-out split of "
        f"{s['eval-examples']} examples no client sees, evaluated by the server after every round. "
        f"fedit, ffa and fedex need equal ranks: rank {out['uniform_rank']} on every client; flora and "
        f"zeropad run with heterogeneous ranks `{hetero}`, and flora also at rank {out['uniform_rank']} for "
        "a like-for-like comparison. The centralized reference trains one rank-"
        f"{out['uniform_rank']} model (same base, same seeded initial adapter) with `train_local` on the "
        f"union of the shares ({out['centralized']['union_examples']} examples) for "
        f"{out['centralized']['steps']} steps of the same batch - the examples all clients see together - "
        "in one chunk per round (fresh AdamW each chunk, like the clients), evaluated after each chunk. "
        "SmolLM2 generation would take too long for six federations on 2 CPU cores, so the "
        "comparison runs on MiniLM.", "",
        report(out), "",
        "![accuracy and loss per round](strategies-quality.png)", "",
        "Per round (accuracy / loss):", "",
    ]
    series = [(r["label"], r["eval_by_round"]) for r in out["runs"]]
    series.append(("centralized", out["centralized"]["eval_by_round"]))
    rounds = sorted(int(k) for k in series[0][1])
    rows = [[label] + [f"{ev[k]['accuracy']:.3f} / {ev[k]['loss']:.3f}" for k in sorted(ev, key=int)]
            for label, ev in series]
    lines += [table(["run", *[f"round {r}" for r in rounds]], rows), ""]
    lines += ["Findings (final round):", "", *findings(out), ""]
    lines += lr_checks(bool(out["quick"]))
    if out.get("notes"):
        lines += [out["notes"], ""]
    lines += [f"This benchmark took {out['wall_seconds'] / 60:.1f} min "
              f"(machine: {out['machine']['cpus']} CPUs, busy cores during the centralized run "
              f"{out['centralized']['busy_cores']:.2f}).", ""]
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
    return ["Learning-rate check (`--lr`; the lr 5e-3 file is a first full run of this script at that lr): "
            "the same federations, everything else equal; accuracy and loss from round 0 to the last:", "",
            table(["lr", "run", "accuracy by round", "loss by round", "wall s"], rows), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-bert, 3 clients, 2 rounds: a smoke test")
    parser.add_argument("--docs-only", action="store_true", help="only rebuild the doc from the results")
    parser.add_argument("--lr", type=float, help="a learning-rate check: only the --runs federations at this "
                        "lr, no reference, no plot; results in strategies_quality-lr<LR>.json")
    parser.add_argument("--runs", default="fedit,ffa,fedex,flora (uniform)",
                        help="with --lr: the run labels to repeat, comma-separated")
    args = parser.parse_args()
    if args.docs_only:
        print(f"doc: {update_doc(args.quick)}")
        return
    start = time.perf_counter()
    base = QUICK if args.quick else BASE
    hetero, uniform = (QUICK_HETERO, QUICK_UNIFORM) if args.quick else (HETERO, UNIFORM)
    if args.lr is not None:
        lr_check(args, {**base, "lr": args.lr}, hetero, uniform, start)
        return
    runs = []
    for label, strategy, ranks in RUNS:
        settings = settings_for(base, strategy, hetero if ranks else None, uniform)
        res = {"label": label, **federated(settings)}
        last = _final(res["eval_by_round"])
        print(f"{label}: accuracy {last['accuracy']:.3f}, loss {last['loss']:.3f} "
              f"({res['wall_seconds']:.0f} s)", flush=True)
        runs.append(res)
    cen = centralized(settings_for(base, "fedit", None, uniform))
    out = {"name": NAME, "quick": args.quick, "base": base, "uniform_rank": uniform, "hetero_ranks": hetero,
           "runs": runs, "centralized": cen, "machine": machine(),
           "wall_seconds": time.perf_counter() - start}
    plot(out, RESULTS / "strategies-quality.quick.png" if args.quick else PLOT)
    print(report(out))
    print("\n".join(findings(out)))
    print(f"results: {save_result(NAME, out)}")
    print(f"doc: {update_doc(args.quick)}")


if __name__ == "__main__":
    main()
