"""Clients killed or frozen mid-round, in real simulations (reliability.md, scenarios 1, 2 and 4).

Six simulated clients run in six Ray worker processes, one each (``sim.workers = 6``); once round 1 is
committed and all six train round 2, the test kills (SIGKILL) or freezes (SIGSTOP) some of those
processes. Flower's simulation engine answers for a killed worker with an error reply (ActorDiedError)
and does not replace it; a frozen one answers late. Six, not reliability.md's ten, with its figures
scaled (quorum 3; 2 and 4 killed; 2 frozen): the engine runs at most min(32, CPU cores + 4)
instructions at once (a default ThreadPoolExecutor: 6 on a 2-core machine), and a worker killed while
instructions still queue takes those too, so only with every instruction running at once does killing k
workers fail exactly k clients.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pollinate.files import sha256_file
from pollinate.server.rundir import RunDir

pytestmark = pytest.mark.slow  # real simulations, minutes

SIX = ["model=tiny-llama", "num-clients=6", "sim.workers=6", "local-steps=60", "eval-examples=8",
       "min-accepted=3"]


def _children(pid: int) -> list[int]:
    """Every descendant of process ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _busy_workers(pid: int) -> list[int]:
    """The simulation's client worker processes (Ray actors of the ClientApp) running an instruction:
    Ray names such a process ``ray::ClientAppActor.run``, an idle one ``ray::ClientAppActor``."""
    def cmdline(child: int) -> str:
        try:
            return Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""
    return sorted(c for c in _children(pid) if "ClientAppActor.run" in cmdline(c))


def _wait(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def _start(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pollinate.cli", "simulate", "--run-dir", str(run),
                             "--set", *SIX, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _in_round_two(proc: subprocess.Popen, run: Path) -> list[int]:
    """Wait until round 1 is committed and all six workers run an instruction of round 2; them."""
    _wait(lambda: (run / "LATEST").exists(), proc, "round 1's commit")
    _wait(lambda: len(_busy_workers(proc.pid)) == 6, proc, "six workers training round 2")
    return _busy_workers(proc.pid)


def _events(run: Path, server_round: int, kind: str) -> list[dict]:
    return [e for e in RunDir(run).events() if e["round"] == server_round and e["event"] == kind]


@pytest.mark.parametrize(("killed", "commits"), [(2, True), (4, False)])
def test_clients_killed_mid_round(tmp_path: Path, killed: int, commits: bool) -> None:  # scenarios 1, 2
    run = tmp_path / "run"
    proc = _start(run, "rounds=2")
    workers = _in_round_two(proc, run)
    before = {p.name: sha256_file(p) for p in (run / "checkpoints" / "round-0001").iterdir()}
    for pid in workers[:killed]:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:] if proc.stderr else ""

    (train,) = _events(run, 2, "train")
    failed = _events(run, 2, "failed")
    assert (train["sampled"], train["accepted"], len(failed)) == (6, 6 - killed, killed)
    assert {e["reason"] for e in failed} == {
        "ActorDiedError: The actor died unexpectedly before finishing this task."}
    assert train["committed"] is commits
    if commits:  # 4 accepted + 2 failed = 6 sampled, in the manifest too
        manifest = json.loads((run / "checkpoints" / "round-0002" / "manifest.json").read_text())
        assert (len(manifest["accepted_nodes"]), len(manifest["rejected_nodes"])) == (4, 2)
    else:  # nothing committed: the global checkpoint is byte for byte what it was
        assert train["not_committed"] == "quorum not reached: 2 accepted, 3 needed"
        assert RunDir(run).latest_checkpoint() == run / "checkpoints" / "round-0001"
        assert not (run / "checkpoints" / "round-0002").exists()
        assert {p.name: sha256_file(p) for p in (run / "checkpoints" / "round-0001").iterdir()} == before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed_clients"] == killed and summary["rounds_completed"] == (2 if commits else 1)


def test_stragglers_past_the_deadline(tmp_path: Path) -> None:  # scenario 4
    run, timeout = tmp_path / "run", 60  # round 1 starts six workers: well within 60 s
    proc = _start(run, "rounds=3", f"round-timeout={timeout}")
    frozen = _in_round_two(proc, run)[:2]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    _wait(lambda: bool(_events(run, 2, "train")), proc, "round 2's close")
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:] if proc.stderr else ""

    (second,) = _events(run, 2, "train")
    assert (second["sampled"], second["accepted"], second["committed"]) == (6, 4, True)
    assert second["round_seconds"] >= timeout  # it closed at the deadline, with the replies in hand
    stale = _events(run, 3, "rejected")
    assert [(e["check"], e["reason"]) for e in stale] == [
        ("envelope", "stale: a reply to an instruction of an earlier round, after its deadline")] * 2
    (third,) = _events(run, 3, "train")
    assert (third["accepted"], third["committed"]) == (6, True)  # the stragglers trained round 3
