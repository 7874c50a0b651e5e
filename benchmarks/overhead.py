"""Framework overhead of a simulated federation: round time against the clients' own training time.

Clients run one at a time (``sim.workers=1``), so a round's wall time (``round_seconds``: send to
aggregated, server evaluation excluded) would equal the sum of the clients' ``train_seconds`` if
pollinate and Flower cost nothing. The ratio of the two is the overhead factor: round 1 (which also
loads the model in the simulation worker) and the steady rounds (mean of rounds >= 2). The fixed
cost of a run is the command's wall time, measured here around the subprocess, minus every round
and every server evaluation.

Anchor: a stock Flower FedAvg app measured on the same model and settings (docs: shared platform.md).

    python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import events_of, machine, mark, read_events, read_summary, run_simulate, save_result, table

NAME = "overhead"
STEADY_GOAL = 1.05  # steady-round factor the project aims for
ANCHOR = {  # stock Flower FedAvg app, same model, 5 steps of 4 x 64 per client
    "steady": 1.02,
    "round1": {4: 1.36, 10: 1.16},  # by number of clients
    "startup_seconds": (13.0, 15.0),
}
FULL = {"model": "smollm2-135m-instruct", "rounds": 3, "local-steps": 5, "batch-size": 4,
        "max-seq-len": 64, "sim.workers": 1}
QUICK = {**FULL, "model": "tiny-llama", "rounds": 2, "local-steps": 2}


def analyse(run: dict[str, Any], num_clients: int) -> dict[str, Any]:
    """Ratios, evaluation times and fixed cost of one finished run."""
    events = read_events(run["run_dir"])
    trains, evals = events_of(events, "train"), events_of(events, "evaluate")
    summary = read_summary(run["run_dir"])
    rounds = [{"round": r, "round_seconds": t["round_seconds"],
               "client_train_seconds": t["client_train_seconds"],
               "ratio": t["round_seconds"] / t["client_train_seconds"],
               # what a round costs beyond training, per client served
               "overhead_per_client_seconds": (t["round_seconds"] - t["client_train_seconds"]) / num_clients,
               "eval_seconds": evals[r]["eval_seconds"]} for r, t in sorted(trains.items())]
    sum_rounds = sum(r["round_seconds"] for r in rounds)
    sum_evals = sum(e["eval_seconds"] for e in evals.values())
    steady = [r["ratio"] for r in rounds if r["round"] >= 2]
    return {
        "num_clients": num_clients, "command": run["command"], "rounds": rounds,
        "ratio_round1": rounds[0]["ratio"],
        "ratio_steady": statistics.mean(steady) if steady else None,
        "eval_seconds_initial": evals[0]["eval_seconds"],
        "eval_seconds_mean_after_rounds": statistics.mean(r["eval_seconds"] for r in rounds),
        "wall_seconds": run["wall_seconds"],
        "sum_round_seconds": sum_rounds, "sum_eval_seconds": sum_evals,
        "fixed_seconds": run["wall_seconds"] - sum_rounds - sum_evals,
        # where the fixed cost lies: outside run_federation (imports, global model, Ray start and
        # shutdown, sample answers) and inside it (checkpoints, report, bookkeeping)
        "outside_run_seconds": run["wall_seconds"] - summary["wall_seconds"],
        "inside_run_other_seconds": summary["wall_seconds"] - sum_rounds - sum_evals,
        "final_eval_loss": summary["final_eval"]["loss"],
        "busy_cores": run["busy_cores"],  # machine-wide; this run alone keeps about 1 core busy
    }


def verdict(res: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The goals of one client count: steady <= 1.05, round 1 no worse than the anchor."""
    anchor1 = ANCHOR["round1"].get(res["num_clients"])
    if quick:  # a tiny model trains in milliseconds: its ratios say nothing about the goals
        return {"anchor_round1": anchor1, "steady_met": None, "round1_met": None}
    steady_met = res["ratio_steady"] is not None and res["ratio_steady"] <= STEADY_GOAL
    round1_met = anchor1 is None or res["ratio_round1"] <= anchor1
    return {"anchor_round1": anchor1, "steady_met": steady_met, "round1_met": round1_met}


def report(results: list[dict[str, Any]]) -> str:
    """The markdown table of every client count."""
    rows = []
    lo, hi = ANCHOR["startup_seconds"]
    for res in results:
        rows.append([
            res["num_clients"], f"{res['ratio_round1']:.2f}",
            f"{res['anchor_round1']:.2f}" if res["anchor_round1"] else "-", mark(res["round1_met"]),
            f"{res['ratio_steady']:.3f}" if res["ratio_steady"] else "-", f"{ANCHOR['steady']:.2f}",
            mark(res["steady_met"]),
            f"{res['eval_seconds_initial']:.1f} / {res['eval_seconds_mean_after_rounds']:.1f}",
            f"{res['fixed_seconds']:.1f} (anchor {lo:.0f}-{hi:.0f})", f"{res['wall_seconds']:.0f}"])
    return table(["clients", "round 1", "anchor", "goal: <= anchor", "steady (rounds >= 2)", "anchor",
                  f"goal: <= {STEADY_GOAL}", "server eval s (round 0 / later)",
                  "fixed start-up + shutdown s", "wall s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: a smoke test")
    parser.add_argument("--server-threads", type=int, metavar="N",
                        help="diagnostic: OMP_NUM_THREADS=N for the command, i.e. N torch threads for the "
                             "server's evaluation (the workers use 1 either way); results go to "
                             "overhead.server-threads-N.json, not into the doc")
    parser.add_argument("--clients", type=int, nargs="+", help="client counts (default 4 10)")
    args = parser.parse_args()
    env = {"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else None
    settings = QUICK if args.quick else FULL
    client_counts = args.clients or ((2, 3) if args.quick else (4, 10))
    results = []
    for n in client_counts:
        with tempfile.TemporaryDirectory(prefix=f"pollinate-overhead-{n}-") as tmp:
            run = run_simulate({**settings, "num-clients": n}, Path(tmp), env)
            res = analyse(run, n)
        res.update(verdict(res, args.quick))
        results.append(res)
        print(f"{n} clients: round 1 {res['ratio_round1']:.3f}, steady {res['ratio_steady']}, "
              f"wall {res['wall_seconds']:.0f} s", flush=True)
    name = f"{NAME}.server-threads-{args.server_threads}" if args.server_threads else NAME
    out = {"name": name, "quick": args.quick, "settings": settings, "anchor": ANCHOR, "env": env,
           "goal": {"steady_max": STEADY_GOAL, "round1": "no worse than the anchor"},
           "machine": machine(), "results": results}
    print(report(results))
    print(f"results: {save_result(name, out)}")


if __name__ == "__main__":
    main()
