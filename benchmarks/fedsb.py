"""Fed-SB against FedIT on SmolLM2 + chatterbot (natural split): bytes per client per round and eval loss.

Real ``pollinate simulate`` runs of the default configuration (4 clients, 3 rounds of 5 local steps of
4 x 64 tokens), fedit at rank 8 against fedsb at ``--ranks`` (default 16 and 8), for every ``--seeds``.
Measured: ``bytes_up`` / ``bytes_down`` of every client event (what Flower serialises), the held-out
eval loss after every round. Bytes per round are the mean over clients of rounds 2.. (round 1 of fedsb
also carries the one-time A, B and R0 down, reported apart). Goal (issue 9): fedsb sends at least 9x
fewer bytes per round than fedit at equal or better final eval loss. The learning rates are the
defaults (lr 3e-3 for fedit, fedsb.lr 5e-3); this script makes no sweep.

    python benchmarks/fedsb.py [--seeds 0 1 2] [--ranks 16 8] [--out docs/benchmarks-fedsb.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import events_of, machine, read_events, read_summary, run_simulate, save_result, table

NAME = "fedsb"


def one_run(settings: dict[str, Any]) -> dict[str, Any]:
    """Run once; per-round eval loss and bytes per client."""
    with tempfile.TemporaryDirectory() as work:
        done = run_simulate(settings, Path(work))
        events, summary = read_events(done["run_dir"]), read_summary(done["run_dir"])
    clients = [e for e in events if e["event"] == "client"]
    later = [e for e in clients if e["round"] > 1]
    first = [e for e in clients if e["round"] == 1]
    return {
        "eval": [events_of(events, "evaluate")[r]["loss"] for r in range(summary["rounds_completed"] + 1)],
        "up": statistics.mean(e["bytes_up"] for e in later),
        "down": statistics.mean(e["bytes_down"] for e in later),
        "down_round1": statistics.mean(e["bytes_down"] for e in first),
        "wall_seconds": done["wall_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks-fedsb.md"))
    args = parser.parse_args()
    variants = {"fedit r8": {"strategy": "fedit"}}
    variants.update({f"fedsb r{r}": {"strategy": "fedsb", "fedsb.rank": r} for r in args.ranks})
    runs = {name: [one_run({**s, "seed": seed}) for seed in args.seeds] for name, s in variants.items()}
    base = runs["fedit r8"]
    rows = []
    for name, results in runs.items():
        final = [r["eval"][-1] for r in results]
        up, down = statistics.mean(r["up"] for r in results), statistics.mean(r["down"] for r in results)
        rows.append([name, f"{statistics.mean(final):.3f}" + (f" ± {statistics.stdev(final):.3f}"
                                                               if len(final) > 1 else ""),
                     f"{up / 1e3:.1f}", f"{down / 1e3:.1f}",
                     f"{statistics.mean(r['down_round1'] for r in results) / 1e6:.2f}",
                     f"{statistics.mean(b['up'] for b in base) / up:.1f}x"])
    curves = [[name, *(f"{statistics.mean(r['eval'][i] for r in res):.3f}"
                       for i in range(len(res[0]["eval"])))] for name, res in runs.items()]
    text = "\n\n".join([
        "# Fed-SB against FedIT (benchmarks/fedsb.py)",
        f"SmolLM2-135M-Instruct on chatterbot (natural split), the default demo configuration; seeds "
        f"{args.seeds}; machine: {machine()}.",
        table(["run", "final eval loss", "kB up / client / round", "kB down / client / round",
               "MB down in round 1", "fewer bytes up than fedit"], rows),
        "Eval loss per round (round 0: before training):",
        table(["run", *(f"round {i}" for i in range(len(curves[0]) - 1))], curves),
    ]) + "\n"
    args.out.write_text(text)
    save_result(NAME, {"seeds": args.seeds, "ranks": args.ranks, "runs": runs})
    print(text)


if __name__ == "__main__":
    main()
