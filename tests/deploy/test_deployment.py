"""End to end on loopback, every part a process of its own: ``pollinate serve`` (a SuperLink with TLS,
node authentication and a database) and three ``pollinate agent`` devices, each training on its own
file; an unregistered key and a plaintext SuperNode are refused while the devices go on; every process
is stopped by PID (reliability.md, scenario 14). The server has none of the devices' data: each device
evaluates on a slice of its own file it holds back (``eval-split = "clients"``). A second run trains
split learning (SFPrompt): its body service, outside Flower, takes each device's own certificate."""

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
from pollinate.deploy.serve import check_free

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


def deep_tiny_llama(folder: Path) -> Path:
    """tiny-llama four blocks deep (SFPrompt needs a head, a body and a tail), saved as a local model
    folder, so that serve's ServerApp and every device load the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    from pollinate import models

    tokenizer = models.load_tokenizer("tiny-llama")
    config = models._tiny_config("tiny-llama", tokenizer, 2)
    config.num_hidden_layers = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_split_learning_devices_reach_the_body_service_with_their_own_certificates(tmp_path: Path) -> None:
    """strategy = sfprompt under serve: the body service listens at sfprompt.body-port with the
    deployment's folder; each device dials it with its own nodes/<name>/ certificate (a copy holding
    only ca.crt and that folder), outside Flower, and reports the split bytes."""
    import shutil

    certs = init(tmp_path / "certs", nodes=2, sans="localhost,127.0.0.1")
    model = deep_tiny_llama(tmp_path / "deep-tiny-llama")
    rows = [{"prompt": f"Say item {i}.", "response": f"Item {i} is here."} for i in range(40)]
    (tmp_path / "server.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    devices = []
    for n in (1, 2):
        device = tmp_path / f"device-{n}"
        (device / "nodes").mkdir(parents=True)
        shutil.copy(certs.ca_crt, device / "ca.crt")
        shutil.copytree(certs.node(f"node-{n}").folder, device / "nodes" / f"node-{n}")
        (device / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10 * n: 10 * n + 12]))
        devices.append(device)
    port, body_port, run = free_port(), free_port(), tmp_path / "run"
    env = {**os.environ, "POLLINATE_DEBUG": ""}
    link = f"127.0.0.1:{port}"
    settings = {"model": model, "strategy": "sfprompt", "dataset": tmp_path / "server.jsonl",
                "partitioner": "iid", "num-clients": 2, "rounds": 1, "local-steps": 2, "batch-size": 4,
                "max-seq-len": 16, "eval-examples": 8, "max-examples": 100, "sfprompt.body-port": body_port,
                "sfprompt.prompt-tokens": 4}
    serve = subprocess.Popen([POLLINATE, "serve", "--certs", str(certs.path), "--address", link,
                              "--state", str(tmp_path / "state"), "--run-dir", str(run), "--wait", "240",
                              "--set", *[f"{k}={v}" for k, v in settings.items()]],
                             stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT, env=env)
    agents, seen = [], {serve.pid: tree(serve.pid)}
    try:
        deadline = time.monotonic() + 60
        while "devices registered" not in (tmp_path / "serve.log").read_text():
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        for n, device in enumerate(devices, start=1):
            key, log_file = device / f"nodes/node-{n}/auth.key", tmp_path / f"node-{n}.log"
            agents.append(subprocess.Popen([
                POLLINATE, "agent", "--certs", str(device), "--key", str(key), "--superlink", link,
                "--data", str(device / "data.jsonl"), "--log", str(log_file)],
                stdout=(tmp_path / f"agent-{n}.log").open("w"), stderr=subprocess.STDOUT, env=env))
        started = time.monotonic()
        while serve.poll() is None:
            for proc in (serve, *agents):
                seen.setdefault(proc.pid, set()).update(tree(proc.pid))
            assert time.monotonic() - started < 240, "the deployment did not finish"
            time.sleep(1.0)
        log = (tmp_path / "serve.log").read_text()
        assert serve.returncode == 0, log
    finally:
        for proc in (serve, *agents):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in agents:
            proc.wait(timeout=60)
    assert f"sfprompt.body-address = 127.0.0.1:{body_port}" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["method"] == "sfprompt"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clients = [e for e in events if e["event"] == "client"]
    assert len(clients) == 2 and not [e for e in events if e["event"] in ("rejected", "failed")]
    for e in clients:  # the split traffic went over the body service, not over Flower
        assert e["method_figures"]["split-bytes-up"] > 0 and e["method_figures"]["split-steps"] == 2
    left = alive(set().union(*seen.values()))
    assert not left, [psutil.Process(p).cmdline()[:3] for p in left]
    check_free("127.0.0.1", body_port)  # the body service went with the ServerApp
