"""End to end on loopback, every part a process of its own: ``pollinate serve`` (a SuperLink with TLS,
node authentication and a database) and three ``pollinate agent`` devices, each training on its own
file; an unregistered key and a plaintext SuperNode are refused while the devices go on; every process
is stopped by PID (reliability.md, scenario 14). The server has none of the devices' data: each device
evaluates on a slice of its own file it holds back (``eval-split = "clients"``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pollinate.deploy.agent import free_port
from pollinate.deploy.certs import init

pytestmark = pytest.mark.slow

POLLINATE = str(Path(sys.executable).parent / "pollinate")



def tree(pid: int) -> set[int]:
    try:
        return {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}


def test_three_devices_train_two_rounds_over_tls_with_node_authentication(tmp_path: Path) -> None:
    certs = init(tmp_path / "certs", nodes=3, sans="localhost,127.0.0.1")
    rogue = init(tmp_path / "rogue", nodes=1, sans="localhost")  # its key was never registered
    files = []
    for n in range(1, 4):
        path = tmp_path / f"device-{n}.jsonl"
        rows = [{"prompt": f"What does device {n} hold, item {i}?", "response": f"Item {i} of {n}."}
                for i in range(6 + 3 * n)]  # 9, 12 and 15 examples: a share of no built-in dataset
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    port, run = free_port(), tmp_path / "run"
    env = {**os.environ, "POLLINATE_DEBUG": ""}
    started = time.monotonic()
    link = f"127.0.0.1:{port}"
    serve = subprocess.Popen([POLLINATE, "serve", "--certs", str(certs.path), "--address", link,
                              "--state", str(tmp_path / "state"), "--run-dir", str(run), "--wait", "240",
                              "--set", "model=tiny-llama", "num-clients=3", "rounds=2", "local-steps=2",
                              "eval-examples=8", "eval-split=clients"],
                             stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT, env=env)
    agents, seen = [], {serve.pid: tree(serve.pid)}
    try:
        deadline = time.monotonic() + 60
        while "devices registered" not in (tmp_path / "serve.log").read_text():
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        for n, data in enumerate(files, start=1):
            key = certs.node(f"node-{n}").auth_key
            agents.append(subprocess.Popen([
                POLLINATE, "agent", "--certs", str(certs.path), "--key", str(key), "--superlink", link,
                "--data", str(data), "--log", str(tmp_path / f"node-{n}.log")],
                stdout=(tmp_path / f"agent-{n}.log").open("w"), stderr=subprocess.STDOUT, env=env))
        intruder = subprocess.run([
            POLLINATE, "agent", "--certs", str(certs.path), "--key", str(rogue.node("node-1").auth_key),
            "--superlink", link, "--data", str(files[0]), "--log", str(tmp_path / "rogue.log")],
            capture_output=True, text=True, timeout=120, env=env)
        plaintext = subprocess.Popen([
            str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink", link,
            "--port", str(free_port()), "--node-config", f'data-path="{files[0]}"'],
            stdout=(tmp_path / "plaintext.log").open("w"), stderr=subprocess.STDOUT,
            env={**env, "FLWR_HOME": str(tmp_path / "plain-home"),
                 "PATH": str(Path(sys.executable).parent) + os.pathsep + env["PATH"]})
        while serve.poll() is None:  # every process the commands start, while they run
            for proc in (serve, *agents):
                seen.setdefault(proc.pid, set()).update(tree(proc.pid))
            assert time.monotonic() - started < 540, "the deployment did not finish"
            time.sleep(1.0)
        log = (tmp_path / "serve.log").read_text()
        assert serve.returncode == 0, log
    finally:
        for proc in (serve, *agents):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in agents:
            proc.wait(timeout=60)
        if "plaintext" in locals():
            plaintext.kill()
            plaintext.wait(timeout=30)
    # the run: two rounds, three devices each, each on its own file
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["num_clients"] == 3
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clients = [e for e in events if e["event"] == "client"]
    assert sorted(e["num_examples"] for e in clients) == [7, 7, 10, 10, 12, 12]  # 2, 2, 3 held back
    evals = [e for e in events if e["event"] == "evaluate"]
    assert [e["round"] for e in evals] == [0, 1, 2]
    assert all((e["eval_on"], e["evaluated"], e["examples"]) == ("clients", 3, 7) for e in evals)
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"]
    registered = set(json.loads((tmp_path / "state/nodes.json").read_text()).values())
    assert {e["node_id"] for e in clients} == registered and len(registered) == 3
    for r in (1, 2):
        manifest = json.loads((run / f"checkpoints/round-{r:04d}/manifest.json").read_text())
        assert len(manifest["accepted_nodes"]) == 3
    # refused: the unregistered key could not activate; the plaintext node never got through
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()
    assert not [e for e in events if e["event"] == "failed"]
    # stopped by PID: nothing the commands started is left
    assert all(proc.returncode is not None for proc in agents)
    left = alive(set().union(*seen.values()))
    assert not left, [psutil.Process(p).cmdline()[:3] for p in left]
