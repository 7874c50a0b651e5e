"""Client-level differential privacy: accuracy of fedsb, fedit and ffa at ε ≈ 1, 3, 8 and without DP.

Real ``pollinate simulate`` runs: MiniLM-L6 on Rotten Tomatoes, 10 Dirichlet(0.5) clients, every client
in every round, the 4-round setting of ``fedsb.py`` (10 local steps of 16 x 64 tokens, 500 held-out
examples) at each strategy's learning rate from that benchmark's sweep (fedsb 0.02, LoRA 0.002).
``dp.mode = "central"``, δ = 1 / 10 (the default: 1 / num-clients).

- Clip: per strategy, the median norm of the clients' round-2 updates (upload minus the received global
  state) in the run without DP at the first seed, the usual choice (about half the updates clipped).
- Noise: per ε, the noise multiplier at which the run's rounds spend exactly that ε (bisection on the
  accountant pollinate uses).
- Cost: the time of the server's release (clip every update, add noise, mean) on 10 uploads of each
  strategy's real shapes, against the time of the rule on the same uploads, and against a round.

    python benchmarks/dp.py --seeds 0 1 2
    python benchmarks/dp.py --cost          # on a quiet machine
    python benchmarks/dp.py --docs-only

Finished runs are kept in ``docs/benchmarks-dp-runs.json`` (an interrupted or later sweep adds to them);
docs/benchmarks-dp.md is rebuilt from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, events_of, machine, read_events, run_simulate, table
from fedsb import SETTINGS

DOC = REPO / "docs" / "benchmarks-dp.md"
PATH = REPO / "docs" / "benchmarks-dp-runs.json"
"""Every finished run's figures (no run folders): kept in git beside the page, so that a later session
adds seeds to these instead of running them all again (each run takes minutes on 2 cores)."""
BASE = dict(SETTINGS["minilm"])
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedsb": {"strategy": "fedsb", "fedsb.rank": 16, "fedsb.lr": 0.02},
    "fedit": {"strategy": "fedit", "lora.rank": 8, "lr": 0.002},
    "ffa": {"strategy": "ffa", "lora.rank": 8, "lr": 0.002},
}
EPSILONS = (8.0, 3.0, 1.0)


def noise_for(epsilon: float, rounds: int, clients: int) -> float:
    """The noise multiplier at which ``rounds`` rounds of every client spend ``epsilon``."""
    from pollinate.privacy.accountant import Accountant
    from pollinate.privacy.settings import DpSettings

    def spent(sigma: float) -> float:
        settings = DpSettings(mode="central", noise_multiplier=sigma)
        return Accountant(settings, clients, clients).epsilon(rounds)

    low, high = 0.05, 100.0
    for _ in range(60):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if spent(mid) > epsilon else (low, mid)
    return high


def update_norms(run_dir: Path, server_round: int = 2) -> list[float]:
    """‖upload − received‖ of every client of ``server_round`` (needs ``save-updates``)."""
    from safetensors.torch import load_file

    received = load_file(run_dir / f"checkpoints/round-{server_round - 1:04d}/state.safetensors")
    norms = []
    for path in sorted((run_dir / f"checkpoints/round-{server_round:04d}").glob("update-*.safetensors")):
        upload = load_file(path)
        norms.append(sum(float((v.double() - received[k].double()).pow(2).sum()) if k in received
                         else float(v.double().pow(2).sum()) for k, v in upload.items()) ** 0.5)
    return norms


def one_run(settings: dict[str, Any], keep: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        done = run_simulate(settings, Path(work))
        events = read_events(done["run_dir"])
        norms = update_norms(done["run_dir"]) if keep else []
        summary = json.loads((done["run_dir"] / "summary.json").read_text())
    evals = events_of(events, "evaluate")
    trains = events_of(events, "train")
    return {"settings": settings, "eval": [evals[r]["loss"] for r in sorted(evals)],
            "accuracy": [evals[r].get("accuracy") for r in sorted(evals)],
            "epsilon": summary.get("epsilon"), "delta": summary.get("delta"),
            "clipped": [trains[r].get("dp_clipped") for r in sorted(trains)],
            "round_seconds": [trains[r]["round_seconds"] for r in sorted(trains)],
            "update_norms": norms, "wall_seconds": done["wall_seconds"]}


def load() -> dict[str, Any]:
    return dict(json.loads(PATH.read_text())) if PATH.exists() else {"runs": {}, "clip": {}, "noise": {}}


def save(out: dict[str, Any]) -> None:
    PATH.write_text(json.dumps(out, indent=2, default=str) + "\n")


def run(args: argparse.Namespace) -> None:
    out = load()
    rounds, clients = BASE["rounds"], BASE["num-clients"]
    out["noise"] = {f"{e:g}": noise_for(e, rounds, clients) for e in EPSILONS}
    for seed in args.seeds:  # seed by seed: a sweep cut short still has every cell for its seeds
        for name, keys in STRATEGIES.items():
            if args.only and name not in args.only:
                continue
            for epsilon in (None, *EPSILONS):
                key = f"{name} {'none' if epsilon is None else f'eps {epsilon:g}'} seed {seed}"
                if key in out["runs"]:
                    continue
                if epsilon is None:  # the first run without DP gives the strategy's clip
                    first = name not in out["clip"]
                    settings = {**BASE, **keys, "seed": seed, **({"save-updates": "true"} if first else {})}
                    out["runs"][key] = {"strategy": name, "epsilon_goal": None, "seed": seed,
                                        **one_run(settings, keep=first)}
                    if first:
                        out["clip"][name] = statistics.median(out["runs"][key]["update_norms"])
                else:
                    dp = {"dp.mode": "central", "dp.clip": out["clip"][name],
                          "dp.noise-multiplier": out["noise"][f"{epsilon:g}"]}
                    out["runs"][key] = {"strategy": name, "epsilon_goal": epsilon, "seed": seed,
                                        **one_run({**BASE, **keys, **dp, "seed": seed})}
                save(out)
    out["machine"] = machine()
    save(out)


def cost(args: argparse.Namespace) -> None:
    """The release's time against the rule's, on 10 uploads of each strategy's real shapes."""
    import torch

    from pollinate.config import RunConfig
    from pollinate.privacy.mechanism import CentralDp, NoPrivacy
    from pollinate.privacy.settings import DpSettings
    from pollinate.protocol import ClientReport
    from pollinate.strategies import build_strategy

    torch.set_num_threads(1)
    out = load()
    rows = {}
    for name, keys in STRATEGIES.items():
        cfg = RunConfig.from_run_config({**BASE, **keys})
        strategy = build_strategy(cfg)
        server = strategy.method.server()
        if name == "fedsb":  # R needs A and B first: the update the setup commits
            server.merge(strategy.method.sample_update(server, 0))
        received = server.upload()
        gen = torch.Generator().manual_seed(0)
        reports = [ClientReport(node=i, examples=100, loss=1.0, seconds=1.0, plan={}, method_figures={},
                                peak=0, process_peak=0, baseline=0, budget=None, estimate=0,
                                examples_seen=100, tokens_seen=0, bytes_up=0, bytes_down=0, version=0,
                                fingerprint=0.0,
                                upload={k: v + 0.01 * torch.randn(v.shape, generator=gen)
                                        for k, v in received.items()})
                   for i in range(BASE["num-clients"])]
        timings = {}
        for label, privacy in (("rule", NoPrivacy(DpSettings())),
                               ("release + rule", CentralDp(DpSettings(mode="central", clip=0.01)))):
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                strategy.combine(privacy.release(reports, received, strategy.method))
                runs.append(time.perf_counter() - start)
            timings[label] = statistics.median(runs)
        numbers = sum(v.numel() for v in received.values())
        rows[name] = {"numbers": numbers, **timings}
    out["cost"] = {"rows": rows, "machine": machine()}
    save(out)


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_doc() -> None:
    out = load()
    runs = list(out["runs"].values())
    goals: list[float | None] = [None, *EPSILONS]
    lines = ["# Differential privacy (benchmarks/dp.py)", "",
             __doc__.split("\n\n")[1].replace("\n", " ").strip() if __doc__ else "", "",
             f"Noise multipliers for ε = {', '.join(f'{k}: σ = {v:.3f}' for k, v in out['noise'].items())} "
             f"(δ = {1 / BASE['num-clients']:g}, {BASE['rounds']} rounds, every client in every round). "
             f"Clip per strategy: {', '.join(f'{k} {v:.4g}' for k, v in out['clip'].items())}.", ""]
    rows, losses = [], []
    for name in STRATEGIES:
        row, loss_row = [name], [name]
        for goal in goals:
            mine = [r for r in runs if r["strategy"] == name and r["epsilon_goal"] == goal]
            row.append(mean_sd([r["accuracy"][-1] for r in mine]))
            loss_row.append(mean_sd([r["eval"][-1] for r in mine]))
        rows.append(row)
        losses.append(loss_row)
    header = ["strategy", "no DP", *(f"ε = {e:g}" for e in EPSILONS)]
    seeds = sorted({r["seed"] for r in runs})
    lines += [f"Final accuracy on the 500 held-out examples, mean ± sd over seeds {seeds}:", "",
              table(header, rows), "", "Final eval loss:", "", table(header, losses), ""]
    diffs = []
    for goal in goals:
        sb = [r["accuracy"][-1] for r in runs if r["strategy"] == "fedsb" and r["epsilon_goal"] == goal]
        ffa = [r["accuracy"][-1] for r in runs if r["strategy"] == "ffa" and r["epsilon_goal"] == goal]
        if sb and ffa:
            gap = 100 * (statistics.mean(sb) - statistics.mean(ffa))
            diffs.append([f"{goal:g}" if goal else "no DP", f"{gap:+.1f}"])
    lines += ["Fed-SB minus FFA-LoRA, accuracy points (the paper reports +3 to +4 under DP):", "",
              table(["ε", "fedsb − ffa"], diffs), ""]
    clipped = []
    for name in STRATEGIES:
        counts = [c for r in runs if r["strategy"] == name and r["epsilon_goal"] for c in r["clipped"]
                  if c is not None]
        if counts:
            clipped.append([name, f"{statistics.mean(counts):.1f}"])
    if clipped:
        lines += ["Clients clipped per round (of 10), mean over the DP runs:", "",
                  table(["strategy", "clipped"], clipped), ""]
    if "cost" in out:
        crow = []
        for name, c in out["cost"]["rows"].items():
            dp_rounds = [s for r in runs if r["strategy"] == name and r["epsilon_goal"]
                         for s in r["round_seconds"][1:]]
            round_s = statistics.median(dp_rounds) if dp_rounds else None
            extra = c["release + rule"] - c["rule"]
            crow.append([name, f"{c['numbers']:,}", f"{1e3 * c['rule']:.1f}",
                         f"{1e3 * c['release + rule']:.1f}", f"{c['release + rule'] / c['rule']:.1f}x",
                         f"{100 * extra / round_s:.2f}%" if round_s else "-"])
        lines += ["Cost of DP per round on the server (10 uploads of the real shapes, one thread, "
                  "median):", "",
                  table(["strategy", "numbers per upload", "rule ms", "release + rule ms", "ratio",
                         "extra time / median DP round"], crow), ""]
    per_run = [[r["strategy"], "none" if r["epsilon_goal"] is None else f"{r['epsilon_goal']:g}", r["seed"],
                f"{r['accuracy'][-1]:.3f}", f"{r['eval'][-1]:.3f}",
                "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
                " ".join("-" if c is None else str(c) for c in r["clipped"]), f"{r['wall_seconds']:.0f}"]
               for r in runs]
    lines += ["Every run (raw figures in benchmarks-dp-runs.json; wall times include runs that shared the "
              "machine with test suites, so they are not speed figures):", "",
              table(["strategy", "ε goal", "seed", "accuracy", "eval loss", "ε spent", "clipped per round",
                     "wall s"], per_run), ""]
    lines += [f"Machine: {out.get('machine') or machine()}.", ""]
    DOC.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=sorted(STRATEGIES))
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--docs-only", action="store_true")
    args = parser.parse_args()
    if args.cost:
        cost(args)
    elif not args.docs_only:
        run(args)
    write_doc()


if __name__ == "__main__":
    main()
