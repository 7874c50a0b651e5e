"""Fed-SB against FedIT, FLoRA and FedEx-LoRA: bytes per client per round, eval loss, client memory.

Real ``pollinate simulate`` runs, one process each, every variant over every ``--seeds``:

* ``--setting smollm2``: SmolLM2-135M-Instruct on chatterbot (natural split), the default demo
  configuration (4 clients, 3 rounds of 5 local steps of 4 x 64 tokens);
* ``--setting minilm``: MiniLM-L6 on Rotten Tomatoes, 10 Dirichlet(0.5) clients, the settings of
  ``strategies_quality.py`` (4 rounds of 10 steps of 16 x 64 tokens, 500 held-out examples).

Variants: fedit, flora and fedex at LoRA rank 8, fedsb at ``--ranks``. Measured: ``bytes_up`` /
``bytes_down`` of every client event (what Flower serialises), mean over clients of rounds 2.. (round 1
of fedsb also carries the one-time A, B and R0 down, reported apart), and the held-out eval loss (and
accuracy) after every round. Goal (issue 9): fedsb sends at least 9x fewer bytes per round than fedit at
equal or better final eval loss.

``--lr-sweep`` first tries each strategy at its learning rates (``SWEEP_LRS``) on seed 0
with ``eval-split = "validation"``: the server evaluates on a validation slice of the training pool that
no client holds, never on the held-out split the results report; every variant then runs at its
strategy's best lr (the lowest final validation loss). ``--rounds`` changes the number of rounds
(the 10-round setting, which takes the 4-round setting's best lrs). ``--memory`` measures a LoRA
client's and a LoRA-SB client's peak at the same plan in fresh processes (``pollinate.client.measure``).

    python benchmarks/fedsb.py --setting smollm2 --seeds 0 1 2
    python benchmarks/fedsb.py --setting minilm --seeds 0 1 2 --lr-sweep
    python benchmarks/fedsb.py --setting minilm --seeds 0 --rounds 10
    python benchmarks/fedsb.py --memory

Finished runs are kept in ``benchmarks/results/fedsb-<setting>.json`` (an interrupted run resumes);
``docs/benchmarks-fedsb.md`` is rebuilt from every results file present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, events_of, machine, read_events, run_simulate, table

from pollinate.config import RunConfig

DOC = REPO / "docs" / "benchmarks-fedsb.md"
SETTINGS: dict[str, dict[str, Any]] = {
    "smollm2": {},  # the defaults of pyproject.toml: the demo
    "minilm": {"model": "minilm-l6", "task": "classification", "dataset": "rotten-tomatoes",
               "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "num-clients": 10, "rounds": 4,
               "local-steps": 10, "batch-size": 16, "max-seq-len": 64, "lr": 0.002,
               "eval-examples": 500, "sim.workers": 2},
}
LORA = ("fedit", "flora", "fedex")
SWEEP_SEED = 0
SWEEP_LRS: dict[str, dict[str, tuple[float, ...]]] = {  # around each setting's defaults
    "smollm2": {"lora": (1e-3, 3e-3, 1e-2), "fedsb": (5e-3, 1e-2, 2e-2)},
    "minilm": {"lora": (1e-3, 2e-3, 5e-3), "fedsb": (5e-3, 1e-2, 2e-2, 5e-2)},  # 2e-2 won at first
}


def variants(ranks: list[int]) -> dict[str, dict[str, Any]]:
    """Label -> the run-config keys of that variant."""
    out: dict[str, dict[str, Any]] = {f"{s} r8": {"strategy": s, "lora.rank": 8} for s in LORA}
    out.update({f"fedsb r{r}": {"strategy": "fedsb", "fedsb.rank": r} for r in ranks})
    return out


def lr_key(strategy: str) -> str:
    """The run-config key of a strategy's learning rate."""
    return "fedsb.lr" if strategy == "fedsb" else "lr"


def lr_of(settings: dict[str, Any]) -> float:
    """The learning rate a run trained its strategy's part with (its own key, or the default)."""
    cfg = RunConfig.from_run_config(settings)
    return cfg.fedsb.lr if cfg.strategy == "fedsb" else cfg.lr


def one_run(settings: dict[str, Any]) -> dict[str, Any]:
    """Run once; eval per round and bytes per client per round."""
    with tempfile.TemporaryDirectory() as work:
        done = run_simulate(settings, Path(work))
        events = read_events(done["run_dir"])
    clients = [e for e in events if e["event"] == "client"]
    later = [e for e in clients if e["round"] > 1] or clients
    evals = events_of(events, "evaluate")
    return {
        "settings": settings, "eval": [evals[r]["loss"] for r in sorted(evals)],
        "accuracy": [evals[r].get("accuracy") for r in sorted(evals)],
        "up": statistics.mean(e["bytes_up"] for e in later),
        "down": statistics.mean(e["bytes_down"] for e in later),
        "down_round1": statistics.mean(e["bytes_down"] for e in clients if e["round"] == 1),
        "wall_seconds": done["wall_seconds"],
    }


def results_path(setting: str, rounds: int | None) -> Path:
    return RESULTS / f"fedsb-{setting}{f'-r{rounds}' if rounds else ''}.json"


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.exists() else {"runs": {}, "sweep": {}}


def save(path: Path, out: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")


def sweep(base: dict[str, Any], grid: dict[str, tuple[float, ...]], out: dict[str, Any],
          path: Path) -> dict[str, float]:
    """Each strategy's best lr by final loss on the validation slice (seed ``SWEEP_SEED``)."""
    best = {}
    for strategy in (*LORA, "fedsb"):
        lrs = grid["lora" if strategy in LORA else "fedsb"]
        for lr in lrs:
            label = f"{strategy} lr {lr:g}"
            if label not in out["sweep"]:
                extra = {"lora.rank": 8} if strategy in LORA else {"fedsb.rank": 16}
                out["sweep"][label] = one_run({**base, **extra, "strategy": strategy, lr_key(strategy): lr,
                                               "seed": SWEEP_SEED, "eval-split": "validation"})
                save(path, out)
        finals = {lr: out["sweep"][f"{strategy} lr {lr:g}"]["eval"][-1] for lr in lrs}
        best[strategy] = min(finals, key=lambda lr: finals[lr])
    return best


def run_setting(args: argparse.Namespace) -> None:
    base = {**SETTINGS[args.setting], **({"rounds": args.rounds} if args.rounds else {})}
    path = results_path(args.setting, args.rounds)
    out = load(path)
    if args.lr_sweep:
        out["best_lr"] = sweep(base, SWEEP_LRS[args.setting], out, path)
    elif args.rounds:  # the longer setting trains at the lrs the 4-round sweep chose
        out["best_lr"] = load(results_path(args.setting, None)).get("best_lr", {})
    best = out.get("best_lr", {})
    for label, keys in variants(args.ranks).items():
        if args.only and label not in args.only:
            continue
        strategy = keys["strategy"]
        settings = {**base, **keys, **({lr_key(strategy): best[strategy]} if strategy in best else {})}
        for seed in args.seeds:
            key = f"{label} lr {lr_of(settings):g} seed {seed}"
            if key not in out["runs"]:
                result = one_run({**settings, "seed": seed})
                out["runs"][key] = {"label": label, "seed": seed, **result}
                save(path, out)
    out["machine"] = machine()
    save(path, out)


def mean_sd(values: list[float], spec: str = ".3f") -> str:
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def reported(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs at their strategy's best lr (all runs where there was no sweep)."""
    best = out.get("best_lr") or {}
    return [r for r in out["runs"].values() if (strategy := r["settings"]["strategy"]) not in best
            or lr_of(r["settings"]) == best[strategy]]


def setting_section(name: str, out: dict[str, Any]) -> list[str]:
    runs_in = reported(out)
    labels = list(dict.fromkeys(r["label"] for r in runs_in))
    by = {lab: [r for r in runs_in if r["label"] == lab] for lab in labels}
    seeds = sorted({r["seed"] for r in runs_in})
    fedit_up = statistics.mean(r["up"] for r in by.get("fedit r8", [])) if "fedit r8" in by else None
    rows, curves = [], []
    for lab, runs in by.items():
        acc = [r["accuracy"][-1] for r in runs if r["accuracy"][-1] is not None]
        up = statistics.mean(r["up"] for r in runs)
        rows.append([lab, mean_sd([r["eval"][-1] for r in runs]), mean_sd(acc) if acc else "-",
                     f"{up / 1e3:.1f}", f"{statistics.mean(r['down'] for r in runs) / 1e3:.1f}",
                     f"{statistics.mean(r['down_round1'] for r in runs) / 1e6:.2f}",
                     f"{fedit_up / up:.1f}x" if fedit_up else "-"])
        n = len(runs[0]["eval"])
        curves.append([lab, *(f"{statistics.mean(r['eval'][i] for r in runs):.3f}" for i in range(n))])
    lines = [f"## {name}", "", f"Seeds {seeds}; {len(curves[0]) - 2} rounds; best lr from the sweep: "
             f"{out.get('best_lr') or 'no sweep (the defaults)'}.", "",
             table(["run", "final eval loss", "final accuracy", "kB up / client / round",
                    "kB down / client / round", "MB down in round 1", "fewer bytes up than fedit"], rows),
             "", "Mean eval loss per round (round 0: before training):", "",
             table(["run", *(f"round {i}" for i in range(len(curves[0]) - 1))], curves), ""]
    if out.get("sweep"):
        sweep_rows = [[k, f"{v['eval'][-1]:.3f}"] for k, v in out["sweep"].items()]
        lines += [f"Learning-rate sweep (seed {SWEEP_SEED}, final loss on the validation slice, not the "
                  "held-out split):", "", table(["run", "final validation loss"], sweep_rows), ""]
    return lines


def memory(args: argparse.Namespace) -> None:
    """A LoRA r8 client's peak against a LoRA-SB client's at the same plan (SmolLM2, 4 x 64)."""
    from pollinate.client.measure import measure_method_peak
    from pollinate.config import RunConfig
    from pollinate.methods import build
    from pollinate.methods.lora.method import LoraPlan
    from pollinate.methods.plan import Plan

    rows = {}
    for label, method, plan, keys in (
            ("lora r8", "lora", LoraPlan("lora", 4, 1, 64, False, rank=8), {"lora.rank": 8}),
            ("lora_sb r16", "lora_sb", Plan("lora_sb", 4, 1, 64, False), {"fedsb.rank": 16})):
        settings = {"model": "smollm2-135m-instruct", **keys}
        measured = measure_method_peak(method, settings, plan)
        built = build(method, RunConfig.from_run_config(settings))
        estimate = built.estimate(built.dims(), plan).total
        rows[label] = {"peak": measured.peak, "estimate": estimate, "seconds": measured.seconds}
    out = {"memory": rows, "machine": machine()}
    save(RESULTS / "fedsb-memory.json", out)


def memory_section(out: dict[str, Any]) -> list[str]:
    rows = [[k, f"{v['peak'] / 1e6:.0f}", f"{v['estimate'] / 1e6:.0f}", f"{v['estimate'] / v['peak']:.2f}",
             f"{v['seconds'] / 3:.2f}"] for k, v in out["memory"].items()]
    lora, sb = out["memory"]["lora r8"]["peak"], out["memory"]["lora_sb r16"]["peak"]
    return ["## Client memory (SmolLM2, 4 x 64 tokens, no checkpointing, one thread)", "",
            table(["client", "measured peak MB", "estimate MB", "estimate / measured", "s / step"], rows),
            "", f"LoRA-SB / LoRA peak: {sb / lora:.2f}.", ""]


def write_doc() -> None:
    lines = ["# Fed-SB (benchmarks/fedsb.py)", "",
             "Fed-SB against FedIT, FLoRA and FedEx-LoRA. Every figure is read from "
             "`benchmarks/results/fedsb-*.json`; rerun with the commands in the script's docstring.", ""]
    titles = {"fedsb-smollm2": "SmolLM2 on chatterbot (natural split, 4 clients)",
              "fedsb-minilm": "MiniLM on Rotten Tomatoes (10 Dirichlet clients)",
              "fedsb-minilm-r10": "MiniLM on Rotten Tomatoes, 10 rounds",
              "fedsb-smollm2-r10": "SmolLM2 on chatterbot, 10 rounds"}
    machines = []
    for stem, title in titles.items():
        path = RESULTS / f"{stem}.json"
        if path.exists():
            out = load(path)
            lines += setting_section(title, out)
            machines.append(out.get("machine"))
    if (RESULTS / "fedsb-memory.json").exists():
        lines += memory_section(json.loads((RESULTS / "fedsb-memory.json").read_text()))
    lines += [f"Machines: {machines[0] if machines else machine()}.", ""]
    DOC.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="smollm2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--lr-sweep", action="store_true")
    parser.add_argument("--only", nargs="+", help="run only these variants, e.g. 'fedit r8' 'fedsb r16'")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--docs-only", action="store_true")
    args = parser.parse_args()
    if args.memory:
        memory(args)
    elif not args.docs_only:
        run_setting(args)
    write_doc()
    print(DOC.read_text())


if __name__ == "__main__":
    main()
