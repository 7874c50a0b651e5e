"""Helpers the benchmark scripts share: running ``pollinate simulate``, reading a run folder, output.

Every benchmark is a standalone script (``python benchmarks/<name>.py [--quick]``) that prints a
markdown table and writes ``benchmarks/results/<name>.json``; ``run_all.py`` turns those files into
docs/benchmarks.md. Nothing here imports torch, so a script's own timings start clean.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
POLLINATE = Path(sys.executable).parent / "pollinate"  # the CLI of the interpreter running us


def machine() -> dict[str, Any]:
    """What the figures were measured on, and which pollinate code was measured."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": os.getloadavg()[0],
            **code_version()}


def code_version() -> dict[str, Any]:
    """The pollinate the CLI imports (PYTHONPATH may point at another copy), its commit and edits."""
    found = subprocess.run([sys.executable, "-c", "import pollinate; print(pollinate.__file__)"],
                           capture_output=True, text=True, check=True,
                           cwd="/").stdout.strip()  # not the repo: -c would put it first on sys.path
    package = Path(found).parent
    git = ["git", "-C", str(package.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    edits = subprocess.run([*git, "status", "--porcelain", "--", "pollinate"], capture_output=True,
                           text=True)
    stamp = package.parent / "COMMIT"  # a copy exported with `git archive` names its commit here
    commit = head.stdout.strip() if head.returncode == 0 else None
    if commit is None and stamp.is_file():
        commit = stamp.read_text().strip()
    return {"pollinate_path": str(package), "git_head": commit,
            "uncommitted_pollinate_files": len(edits.stdout.splitlines()) if edits.returncode == 0 else None}


class CpuMeter:
    """Mean number of busy CPU cores, machine-wide, between ``start`` and ``stop`` (from /proc/stat).

    The benchmarks time wall clocks on a 2-core machine: anything else running at the same time
    slows them. This says how busy the machine was, so a disturbed figure can be recognised.
    """

    def __init__(self) -> None:
        self._start = self._read()
        self._t0 = time.monotonic()

    @staticmethod
    def _read() -> tuple[float, float]:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        except OSError:
            return 0.0, 0.0
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        return sum(fields) - idle, sum(fields)

    def busy_cores(self) -> float | None:
        """Busy cores averaged since construction (None where /proc/stat is missing)."""
        busy, total = self._read()
        d_busy, d_total = busy - self._start[0], total - self._start[1]
        if d_total <= 0:
            return None
        return d_busy / d_total * (os.cpu_count() or 1)


def run_simulate(settings: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """Run ``pollinate simulate`` in a fresh process; returns its wall time and its run folder.

    The wall time is measured here, around the whole command: interpreter start, imports, Ray
    start-up, the run and the shutdown. Ray gets its own temporary folder under ``workdir``.
    """
    run_dir, ray_tmp = workdir / "run", Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    cmd = [str(POLLINATE), "simulate", "--run-dir", str(run_dir)]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, **(env or {}), "RAY_TMPDIR": str(ray_tmp)}
    meter, start = CpuMeter(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    busy = meter.busy_cores()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    (workdir / "stdout.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"command": " ".join(cmd[1:]), "wall_seconds": wall, "run_dir": run_dir, "busy_cores": busy}


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The events of a run's metrics.jsonl, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def events_of(events: Sequence[dict[str, Any]], kind: str) -> dict[int, dict[str, Any]]:
    """The events of one kind (``train``, ``evaluate``) keyed by round."""
    return {e["round"]: e for e in events if e["event"] == kind}


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json."""
    return dict(json.loads((run_dir / "summary.json").read_text()))


def save_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (a quick run writes ``<name>.quick.json``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ".quick.json" if result.get("quick") else ".json"
    path = RESULTS / f"{name}{suffix}"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats are written with 3 significant decimals unless already strings."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mark(met: bool | None) -> str:
    """How a table says whether a goal is met (None: not judged, e.g. a quick run)."""
    if met is None:
        return "n/a"
    return "**met**" if met else "**missed**"


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
