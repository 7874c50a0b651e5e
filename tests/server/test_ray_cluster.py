"""``sim.ray-address``: a simulation joins a Ray cluster started on its own (``ray start --head``)
instead of starting a local Ray, and the cluster outlives the run."""

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pollinate.cli import main
from pollinate.config import RunConfig
from pollinate.deploy.agent import free_port
from pollinate.server.simulation import backend_config

RAY = str(Path(sys.executable).parent / "ray")


def test_backend_config_joins_a_cluster_without_claiming_its_resources() -> None:
    local = backend_config(RunConfig.from_run_config({"sim.workers": 3, "num-clients": 5}))
    assert local["init_args"]["num_cpus"] == 3 and "address" not in local["init_args"]
    joined = backend_config(RunConfig.from_run_config({"sim.ray-address": "10.0.0.1:6379"}))
    assert joined["init_args"]["address"] == "10.0.0.1:6379"
    assert not {"num_cpus", "num_gpus", "include_dashboard"} & set(joined["init_args"])



@pytest.mark.slow
def test_a_simulation_runs_on_an_existing_cluster(tmp_path: Path) -> None:
    temp = Path(tempfile.mkdtemp(prefix="pollinate-cluster-", dir="/tmp"))  # Ray's socket paths are short
    port = free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--temp-dir", str(temp), "--include-dashboard", "false",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _listening(port):
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        run = tmp_path / "run"
        address = f"sim.ray-address=127.0.0.1:{port}"
        assert main(["simulate", "--run-dir", str(run), "--set", "model=tiny-llama", "num-clients=2",
                     "rounds=1", "local-steps=2", "eval-examples=8", address]) == 0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["rounds_completed"] == 1 and summary["failed_clients"] == 0
        assert head.poll() is None  # the run left the cluster up
    finally:  # this cluster's processes only (another Ray on the machine is left alone)
        cluster = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
        head.terminate()  # --block: ray stops what it started
        _, left = psutil.wait_procs(cluster, timeout=30)
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
