"""The server under a long run and under attack, in real simulations (issue 13; reliability.md 11, 19).

``soak``: 10 tiny-llama clients for 50 rounds (2 workers, 2 local steps). Every 0.25 s the resident
memory of the server process (the ``pollinate simulate`` driver) and of its whole process tree (Ray and
the client workers too) is read from /proc and kept per round; the goal is a peak growth below 10%
between round 10 and round 50.

``attack``: MiniLM-L6 on Rotten Tomatoes, 10 Dirichlet(0.5) clients, 4 rounds of 10 steps of 16 x 64
(the setting of ``strategies_quality.py``), FedIT at rank 8. Partition 0 is an attacker: a ClientApp
that runs pollinate's own ``train`` and multiplies both LoRA factors of its reply by 10, so its update
B·A is 100x. Runs: no attacker; the attacker against no defence (``update-bound = 0``); against the
default bound (rejected above 10x the round's median); against ``robust = "clip"`` at that bound and at
2x the median. Goal: accuracy with a defence within 2 points of the run without attacker.

    python benchmarks/faults.py soak
    python benchmarks/faults.py attack [--only NAME ...]   # --only: rerun those runs, keep the rest
    python benchmarks/faults.py attack --rounds 10          # the same at 10 rounds (a model that learned)

Writes ``benchmarks/results/faults-soak.json`` and ``faults-attack[-r<rounds>].json``;
``docs/benchmarks-faults.md`` is rebuilt from every such file present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import POLLINATE, REPO, RESULTS, events_of, machine, mark, read_events, read_summary, table

DOC = REPO / "docs" / "benchmarks-faults.md"
SOAK = {"model": "tiny-llama", "num-clients": 10, "rounds": 50, "local-steps": 2, "eval-examples": 8}
ATTACK = {"model": "minilm-l6", "task": "classification", "dataset": "rotten-tomatoes",
          "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "num-clients": 10, "rounds": 4,
          "local-steps": 10, "batch-size": 16, "max-seq-len": 64, "lr": 0.002, "eval-examples": 500,
          "strategy": "fedit", "lora.rank": 8}
DEFENCES: dict[str, dict[str, Any]] = {
    "no attacker": {}, "attacker, no defence": {"update-bound": 0},
    "attacker, bound (reject)": {}, "attacker, robust = clip": {"robust": "clip"},
    "attacker, clip at 2x the median": {"robust": "clip", "update-bound": 2},
}
ATTACKER = 0  # the partition that attacks
FACTOR = 10.0  # on each LoRA factor: 100x on B·A


def rss(pid: int) -> int:
    """Resident bytes of one process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]),
                                   []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def soak() -> dict[str, Any]:
    """Run the soak and sample its memory per round."""
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    run = work / "run"
    cmd = [str(POLLINATE), "simulate", "--run-dir", str(run)]
    for key, value in SOAK.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks: dict[int, dict[str, int]] = {}

    def sample() -> None:
        while proc.poll() is None:
            try:
                lines = (run / "metrics.jsonl").read_text().count('"event": "train"')
            except OSError:
                lines = 0
            server, tree = rss(proc.pid), sum(rss(p) for p in [proc.pid, *descendants(proc.pid)])
            peak = peaks.setdefault(lines + 1, {"server": 0, "tree": 0})
            peak["server"], peak["tree"] = max(peak["server"], server), max(peak["tree"], tree)
            time.sleep(0.25)

    start = time.perf_counter()
    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code})")
    rounds = SOAK["rounds"]
    growth = {part: peaks[rounds][part] / peaks[10][part] - 1 for part in ("server", "tree")}
    summary = read_summary(run)
    return {"settings": SOAK, "peaks": peaks, "growth_10_to_50": growth,
            "wall_seconds": time.perf_counter() - start, "rounds_completed": summary["rounds_completed"],
            "failed": summary["failed_clients"], "rejected": summary["rejected_updates"],
            "machine": machine()}


def attack_file(rounds: int) -> Path:
    """The results file of the attack at ``rounds`` rounds."""
    return RESULTS / ("faults-attack.json" if rounds == ATTACK["rounds"] else f"faults-attack-r{rounds}.json")


def attack_run(name: str, run_dir: Path, rounds: int) -> None:
    """One run of the attack setting, in this process (``--one``)."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from pollinate import protocol
    from pollinate.client import app as pollinate_client
    from pollinate.config import RunConfig
    from pollinate.server.app import make_server_app, prepare
    from pollinate.server.simulation import backend_config

    attacked = ClientApp()

    @attacked.train()
    def train(msg: Message, context: Context) -> Message:
        reply = pollinate_client.train(msg, context)
        if name != "no attacker" and int(context.node_config["partition-id"]) == ATTACKER \
                and not reply.has_error():
            upload = protocol.from_record(protocol.arrays_of(reply))
            reply.content[protocol.ARRAYS] = protocol.to_record({k: v * FACTOR for k, v in upload.items()})
        return reply

    attacked.evaluate()(pollinate_client.evaluate_share)
    attacked.query()(pollinate_client.setup)
    cfg = RunConfig.from_run_config({**ATTACK, **DEFENCES[name], "rounds": rounds, "run-dir": str(run_dir)})
    failures: list[Any] = []
    run_simulation(server_app=make_server_app(cfg, run_dir, prepare(cfg), failures), client_app=attacked,
                   num_supernodes=cfg.num_clients, backend_config=backend_config(cfg))
    if failures:
        raise failures[0]


def attack(only: list[str] | None, rounds: int) -> dict[str, Any]:
    """Every defence (or ``only`` those, keeping the other runs on record), each in a fresh process."""
    saved = attack_file(rounds)
    out: dict[str, Any] = {"settings": {**ATTACK, "rounds": rounds}, "factor_on_update": FACTOR ** 2,
                           "runs": {}, "machine": machine()}
    if only and saved.exists():
        out["runs"] = json.loads(saved.read_text())["runs"]
    for name in only or DEFENCES:
        run_dir = Path(tempfile.mkdtemp(prefix="attack-")) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--one", name, str(run_dir), str(rounds)], check=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
        events, summary = read_events(run_dir), read_summary(run_dir)
        out["runs"][name] = {
            "accuracy": summary["final_eval"]["accuracy"], "loss": summary["final_eval"]["loss"],
            "initial_accuracy": summary["initial_eval"]["accuracy"],
            "rejected": summary["rejected_by_check"], "clipped": sum(e["event"] == "clipped" for e in events),
            "accepted_per_round": [e["accepted"] for e in events_of(events, "train").values()],
            "wall_seconds": time.perf_counter() - start}
        print(name, out["runs"][name], flush=True)
    return out


def write_doc() -> None:
    """docs/benchmarks-faults.md from every results file present."""
    parts = ["# Faults and attacks (benchmarks/faults.py)", ""]
    soak_file = RESULTS / "faults-soak.json"
    if soak_file.exists():
        s = json.loads(soak_file.read_text())
        peaks = {int(k): v for k, v in s["peaks"].items()}
        rows = [[r, f"{peaks[r]['server'] / 2**20:.0f}", f"{peaks[r]['tree'] / 2**20:.0f}"]
                for r in (1, 2, 10, 20, 30, 40, 50) if r in peaks]
        g = s["growth_10_to_50"]
        parts += ["## Soak: 10 clients, 50 rounds", "",
                  f"tiny-llama, {s['settings']['local-steps']} local steps, 2 workers; the peak resident "
                  "memory of each round, of the server process and of its whole process tree (Ray and the "
                  f"client workers). {s['rounds_completed']} rounds committed in {s['wall_seconds']:.0f} s, "
                  f"{s['failed']} failed and {s['rejected']} rejected replies.", "",
                  table(["round", "server MiB", "process tree MiB"], rows), "",
                  f"Growth of the peak from round 10 to round 50: server {g['server']:+.1%}, process tree "
                  f"{g['tree']:+.1%}; goal below +10%: {mark(max(g.values()) < 0.10)}.", "",
                  f"Machine: {s['machine']}.", ""]
    for path in sorted(RESULTS.glob("faults-attack*.json"), key=lambda p: len(p.name)):
        a = json.loads(path.read_text())
        clean = a["runs"]["no attacker"]["accuracy"]
        rows = [[name, f"{r['accuracy']:.3f}", f"{(r['accuracy'] - clean) * 100:+.1f}",
                 "-" if name == "no attacker" else mark(abs(r["accuracy"] - clean) <= 0.02),
                 f"{r['loss']:.3f}", ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "0",
                 r["clipped"], " ".join(map(str, r["accepted_per_round"]))]
                for name, r in a["runs"].items()]
        rounds = a["settings"]["rounds"]
        parts += [f"## One attacker of ten: its update 100x, {rounds} rounds", "",
                  f"MiniLM-L6 on Rotten Tomatoes, 10 Dirichlet(0.5) clients, {rounds} rounds, FedIT rank 8, "
                  "500 held-out examples, seed 0. Partition 0 multiplies both LoRA factors of every reply by "
                  f"{a['factor_on_update'] ** 0.5:.0f} (B·A by {a['factor_on_update']:.0f}).", "",
                  table(["run", "accuracy", "points vs no attacker", "within 2 points (goal)", "eval loss",
                         "rejected", "clipped", "accepted per round"], rows), "",
                  f"Machine: {a['machine']}.", ""]
    DOC.write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=["soak", "attack", "docs"], default="docs")
    parser.add_argument("--only", nargs="+", choices=sorted(DEFENCES), help="attack: rerun only these")
    parser.add_argument("--rounds", type=int, default=ATTACK["rounds"], help="attack: rounds per run")
    parser.add_argument("--one", nargs=3, metavar=("RUN", "RUN_DIR", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        attack_run(args.one[0], Path(args.one[1]), int(args.one[2]))
        return
    if args.what != "docs":
        result = soak() if args.what == "soak" else attack(args.only, args.rounds)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "faults-soak.json" if args.what == "soak" else attack_file(args.rounds)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_doc()
    print(DOC.read_text())


if __name__ == "__main__":
    main()
