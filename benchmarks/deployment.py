"""What a real deployment costs against the same run in simulation (issue 12).

One run, twice: ``pollinate simulate`` (Flower's simulation engine, Ray), and ``pollinate serve`` with
three ``pollinate agent`` processes on loopback (SuperLink, SuperNodes, TLS and node authentication, each
part a process of its own). tiny-llama, 3 clients, 3 rounds. Each agent's data file is exactly the share
the simulation gives that client (written from ``pollinate.workload.shares``), so both runs train on the
same examples and send the same messages: bytes should match, and the wall-time ratio is what the
deployment costs.

Measured for the deployment, from outside, every 0.25 s:
- time from starting ``pollinate serve`` to the SuperLink being ready, to every device online, and to
  the first instruction reaching a device (the first ``flwr-clientapp`` process under an agent: with the
  server's own evaluation, that is round 1's training);
- each agent's resident memory (the ``pollinate agent`` process and its SuperNode; the ClientApp
  processes it spawns per instruction counted apart): idle (no ClientApp running), before the run and
  after it, and its peak while training.

    python benchmarks/deployment.py [--rounds 3]

Writes ``benchmarks/results/deployment.json`` and ``docs/benchmarks-deployment.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import (
    POLLINATE,
    REPO,
    CpuMeter,
    events_of,
    machine,
    read_events,
    read_summary,
    run_simulate,
    save_result,
    table,
)

DOC = REPO / "docs" / "benchmarks-deployment.md"
SETTINGS = {"model": "tiny-llama", "num-clients": 3, "local-steps": 5, "eval-examples": 16}
SAMPLE = 0.25  # seconds between memory samples
MB = 1e6


def device_files(settings: dict[str, Any], folder: Path) -> list[Path]:
    """Each client's simulated share as a device's own .jsonl file."""
    from pollinate import workload
    from pollinate.config import RunConfig

    cfg = RunConfig.from_run_config(settings)
    paths = []
    for n, share in enumerate(workload.shares(cfg)):
        path = folder / f"device-{n}.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                                for r in share))
        paths.append(path)
    return paths


def free_port() -> int:
    from pollinate.deploy.agent import free_port as port

    return port()


class AgentMemory:
    """Samples each agent's process tree until stopped: its own processes apart from ClientApps."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.samples: list[tuple[float, list[int], list[int]]] = []  # (t, own RSS, ClientApp RSS) per agent
        self.first_clientapp: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            own, apps = [], []
            for pid in list(self.pids):
                mine, theirs = 0, 0
                try:
                    root = psutil.Process(pid)
                    for proc in [root, *root.children(recursive=True)]:
                        rss = proc.memory_info().rss
                        if any("clientapp" in part for part in proc.cmdline()[:2]):
                            theirs += rss
                        else:
                            mine += rss
                except psutil.Error:
                    pass
                own.append(mine)
                apps.append(theirs)
            if any(apps) and self.first_clientapp is None:
                self.first_clientapp = time.monotonic()
            self.samples.append((time.monotonic(), own, apps))
            time.sleep(SAMPLE)

    def idle(self, before: float | None = None, after: float | None = None) -> list[int]:
        """Each agent's median own RSS in samples with no ClientApp running, in the window given (the
        median: the agent's start-up check of its data file runs in a child for a moment)."""
        picked = [s for s in self.samples if not any(s[2]) and len(s[1]) == len(self.pids)
                  and (before is None or s[0] < before) and (after is None or s[0] > after)]
        if not picked:
            return []
        return [int(statistics.median(s[1][i] for s in picked)) for i in range(len(self.pids))]

    def busy_peak(self) -> list[int]:
        """Each agent's largest total RSS (own and ClientApps) over the run."""
        return [max(s[1][i] + s[2][i] for s in self.samples if len(s[1]) == len(self.pids))
                for i in range(len(self.pids))]


def deploy(settings: dict[str, Any], files: list[Path], work: Path) -> dict[str, Any]:
    """``pollinate serve`` and three agents; the run's figures and the timings seen from outside."""
    from pollinate.deploy.certs import init

    certs = init(work / "certs", nodes=len(files), sans="localhost,127.0.0.1")
    link, run = f"127.0.0.1:{free_port()}", work / "run"
    log = work / "serve.log"
    sets = [f"{k}={v}" for k, v in settings.items()]
    memory = AgentMemory()
    memory.start()
    meter, t0 = CpuMeter(), time.monotonic()
    serve = subprocess.Popen([str(POLLINATE), "serve", "--certs", str(certs.path), "--address", link,
                              "--state", str(work / "state"), "--run-dir", str(run), "--wait", "240",
                              "--set", *sets], stdout=log.open("w"), stderr=subprocess.STDOUT)
    agents: list[subprocess.Popen[bytes]] = []
    marks: dict[str, float] = {}
    try:
        while "devices registered" not in log.read_text():
            if serve.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"pollinate serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        marks["superlink_ready"] = time.monotonic() - t0
        for n, data in enumerate(files, start=1):
            agents.append(subprocess.Popen(
                [str(POLLINATE), "agent", "--certs", str(certs.path), "--key",
                 str(certs.node(f"node-{n}").auth_key), "--superlink", link, "--data", str(data),
                 "--log", str(work / f"node-{n}.log")],
                stdout=(work / f"agent-{n}.log").open("w"), stderr=subprocess.STDOUT))
            memory.pids.append(agents[-1].pid)
        while "starting the run" not in log.read_text():
            if serve.poll() is not None:
                raise RuntimeError(f"pollinate serve stopped:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        marks["devices_online"] = time.monotonic() - t0
        serve.wait(timeout=1800)
        marks["serve_exit"] = time.monotonic() - t0
        if serve.returncode != 0:
            raise RuntimeError(f"pollinate serve failed:\n{log.read_text()[-3000:]}")
        time.sleep(5.0)  # the agents, idle again
    finally:
        memory.stop()
        for proc in (serve, *agents):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in agents:
            proc.wait(timeout=60)
    busy = meter.busy_cores()
    assert memory.first_clientapp is not None
    first = memory.first_clientapp
    marks["first_instruction"] = first - t0
    return {"marks": marks, "busy_cores": busy, "summary": read_summary(run), "events": read_events(run),
            "agent_idle_before_bytes": memory.idle(before=first),
            "agent_idle_after_bytes": memory.idle(after=t0 + marks["serve_exit"]),
            "agent_busy_peak_bytes": memory.busy_peak()}


def figures(summary: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    trains = events_of(events, "train")
    return {"wall_seconds": summary["wall_seconds"], "bytes_up": summary["bytes_up_total"],
            "bytes_down": summary["bytes_down_total"], "final_loss": summary["final_eval"]["loss"],
            "initial_loss": summary["initial_eval"]["loss"],
            "round_seconds": [trains[r]["round_seconds"] for r in sorted(trains)],
            "client_train_seconds": [trains[r]["client_train_seconds"] for r in sorted(trains)]}


def write_doc(res: dict[str, Any]) -> None:
    sim, dep = res["simulation"], res["deployment"]
    marks = dep["marks"]
    s = res["settings"]
    rows = []
    for name, key, spec in (("wall time of the run, s (summary.json)", "wall_seconds", ".1f"),
                            ("bytes up", "bytes_up", ",d"), ("bytes down", "bytes_down", ",d"),
                            ("eval loss before -> after", None, "")):
        if key is None:
            rows.append([name, f"{sim['initial_loss']:.3f} -> {sim['final_loss']:.3f}",
                         f"{dep['initial_loss']:.3f} -> {dep['final_loss']:.3f}", ""])
        else:
            ratio = dep[key] / sim[key] if sim[key] else float("nan")
            rows.append([name, format(sim[key], spec), format(dep[key], spec), f"{ratio:.2f}"])
    for r, (a, b) in enumerate(zip(sim["round_seconds"], dep["round_seconds"], strict=True), start=1):
        rows.append([f"round {r}: send to aggregate, s", f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}"])
    sim_train, dep_train = sum(sim["client_train_seconds"]), sum(dep["client_train_seconds"])
    rows.append(["clients' own training, s (all rounds)", f"{sim_train:.1f}", f"{dep_train:.1f}",
                 f"{dep_train / sim_train:.2f}"])
    mem = [[f"node-{i + 1}", f"{before / MB:.0f}", f"{after / MB:.0f}", f"{peak / MB:.0f}"]
           for i, (before, after, peak) in enumerate(zip(dep["agent_idle_before_bytes"],
                                                         dep["agent_idle_after_bytes"],
                                                         dep["agent_busy_peak_bytes"], strict=True))]
    lines = [
        "# Deployment against simulation", "",
        f"`benchmarks/deployment.py`, {res['date']}; {s['model']}, {s['num-clients']} clients, "
        f"{s['rounds']} rounds of {s['local-steps']} local steps; the deployment is `pollinate serve` "
        "(SuperLink with TLS, node authentication and a state database) and three `pollinate agent` "
        "processes on loopback, each training on a file holding exactly the share the simulation gives "
        f"that client. Machine: {res['machine']['cpus']} cores, busy cores during the deployment "
        f"{dep['busy_cores']:.2f} (the simulation: {res['simulation_busy_cores']:.2f}).", "",
        "## Time to the first round", "",
        table(["from starting `pollinate serve`", "s"], [
            ["SuperLink ready, node keys registered", f"{marks['superlink_ready']:.1f}"],
            ["three agents started then, all online", f"{marks['devices_online']:.1f}"],
            ["first instruction at a device (round 1's training)", f"{marks['first_instruction']:.1f}"],
            ["`pollinate serve` exits (run complete)", f"{marks['serve_exit']:.1f}"]]), "",
        "## The same run, simulated and deployed", "",
        table(["", "simulation", "deployment", "ratio"], rows), "",
        "The bytes are Flower's messages, counted the same way in both. The eval losses differ a little "
        "because a device draws its batch order from its node id (a simulated client: from its partition). "
        "Where the time goes was not measured part by part: for every instruction the SuperNode starts a "
        "fresh `flwr-clientapp` process, which imports torch and builds the model before it trains, and "
        "the clients' own training seconds are those of a cold process (its first steps), three of them on "
        "this machine's cores at once; a simulation's Ray workers stay warm from round 2 on.", "",
        "## An agent's memory", "",
        "Resident memory of `pollinate agent` and its SuperNode (the ClientApp processes the SuperNode "
        "starts for each instruction are counted only in the peak), MB:", "",
        table(["agent", "idle before the run (median)", "idle after it (median)",
               "peak while training (with its ClientApp)"],
              mem), "",
    ]
    DOC.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = {**SETTINGS, "rounds": args.rounds}
    work = Path(tempfile.mkdtemp(prefix="pollinate-deploy-bench-"))
    try:
        files = device_files(settings, work)
        (work / "sim").mkdir()
        meter = CpuMeter()
        sim_run = run_simulate(settings, work / "sim")
        sim_busy = meter.busy_cores()
        sim = figures(read_summary(sim_run["run_dir"]), read_events(sim_run["run_dir"]))
        dep_raw = deploy(settings, files, work / "deploy")
        dep = {**figures(dep_raw["summary"], dep_raw["events"]),
               **{k: v for k, v in dep_raw.items() if k not in ("summary", "events")}}
        res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": settings,
               "simulation": sim, "simulation_busy_cores": sim_busy, "deployment": dep}
        save_result("deployment", res)
        write_doc(res)
        print(DOC.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
