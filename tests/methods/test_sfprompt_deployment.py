"""SFPrompt in a deployment (docs/deployment.md, "The split-learning body service"): the body service
starts as ``pollinate serve`` starts it (the deployment's certificate folder, serve's host,
``sfprompt.body-port``) and a device's ClientApp trains over real mutual TLS on loopback with its own
certificate from the node config ``pollinate agent`` writes, never with a path the server sent; wrong
certificates, identities and settings are refused in one line.

The model is tiny-llama made four blocks deep (head 1, body 2, tail 1), on a few dozen rows.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from sfprompt_helpers import deep_tiny, small_dataset

from pollinate import protocol as wire
from pollinate.client import app
from pollinate.config import RunConfig
from pollinate.deploy.agent import free_port, node_config
from pollinate.deploy.certs import CertFolder, DeviceTls, init
from pollinate.deploy.serve import for_deployment
from pollinate.strategies.sfprompt import SfPrompt

LINK_PORT = 9  # the SuperLink's port in these tests: nothing listens there, nothing needs to


def _cfg(data: Path, **extra: Any) -> RunConfig:
    return RunConfig.from_run_config({
        "model": "tiny-llama", "strategy": "sfprompt", "dataset": str(data), "partitioner": "iid",
        "num-clients": 2, "eval-examples": 8, "local-steps": 2, "batch-size": 4, "max-seq-len": 8,
        "sfprompt.prompt-tokens": 4, **extra})


def device_copy(certs: CertFolder, node: str, folder: Path, signed_by: CertFolder | None = None) -> Path:
    """What a device holds: ``ca.crt`` and its own ``nodes/<node>/`` (that of ``signed_by`` when given)."""
    folder.mkdir()
    shutil.copy(certs.ca_crt, folder / "ca.crt")
    shutil.copytree((signed_by or certs).node(node).folder, folder / "nodes" / node)
    return folder


class Served:
    """A strategy configured as ``pollinate serve`` configures it, its body service running on 0.0.0.0
    (serve's default host), and the server's trainee."""

    def __init__(self, cfg: RunConfig, certs: CertFolder) -> None:
        self.cfg = for_deployment(cfg, certs, ("0.0.0.0", LINK_PORT))
        self.strategy = SfPrompt(self.cfg)
        self.server = self.strategy.method.server()
        self.strategy.start_body(self.server)

    def instruction(self) -> Message:
        state = self.strategy.method.initial_state(self.server)
        config = ConfigRecord({**self.cfg.to_run_config(), wire.ROUND: 1})
        return self.strategy.node_message(7, wire.to_record(state), config, 0)


@pytest.fixture
def certs(tmp_path: Path) -> CertFolder:
    return init(tmp_path / "certs", nodes=2, sans="localhost,127.0.0.1")


@pytest.fixture
def served(certs: CertFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    deep_tiny(monkeypatch)
    started = Served(_cfg(small_dataset(tmp_path, "generation"), **{"sfprompt.body-port": free_port()}),
                     certs)
    yield started
    started.strategy.teardown()


def device_context(data: Path, tls: DeviceTls | None, run_id: int, **extra: str) -> Context:
    """The node config ``pollinate agent`` gives the SuperNode, parsed as Flower parses it."""
    from flwr.common.config import parse_config_args

    config = parse_config_args([node_config(data, None, {}, tls)])
    return Context(run_id=run_id, node_id=7, node_config={**config, **extra}, state=RecordDict(),
                   run_config={})


def test_serve_sets_the_deployments_folder_and_sends_devices_only_the_address(
        served: Served, certs: CertFolder) -> None:
    port = served.cfg.sfprompt.body_port
    assert served.cfg.sfprompt.certs == str(certs.path.resolve())
    assert served.strategy.service.address == f"0.0.0.0:{port}"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # listening where serve's --address host says, at sfprompt.body-port
    assert served.strategy.service_config() == {"sfprompt.body-address": f"0.0.0.0:{port}",
                                                "sfprompt.certs": ""}  # the server's folder stays there
    served.strategy.teardown()
    assert (certs.path / "ca.key").is_file()  # the deployment's folder is never deleted


def test_a_device_trains_a_round_with_its_own_certificate(
        served: Served, certs: CertFolder, tmp_path: Path, flower_task: None) -> None:
    """The device holds only ca.crt and nodes/node-2/; it dials localhost (its --superlink host), not the
    0.0.0.0 the server listens on."""
    folder = device_copy(certs, "node-2", tmp_path / "device")
    data = small_dataset(tmp_path, "generation", rows=12)
    context = device_context(data, DeviceTls(folder, "node-2", "localhost"), run_id=801)
    assert {k: context.node_config[k] for k in ("certs", "node-name", "server-host")} == {
        "certs": str(folder), "node-name": "node-2", "server-host": "localhost"}
    reply = app.train(served.instruction(), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = wire.metrics_of(reply)
    assert wire.metric(metrics, wire.METHOD + "split-bytes-up") > 0
    assert wire.metric(metrics, wire.METHOD + "split-bytes-down") > 0
    assert wire.metric(metrics, wire.METHOD + "split-steps") == 2
    assert served.strategy.service.sessions() == []  # the device closed its session


@pytest.mark.parametrize("case", ["foreign device certificate", "no device files", "wrong server name",
                                  "no identity", "half an identity"])
def test_a_wrong_device_identity_is_refused_in_one_line(
        case: str, served: Served, certs: CertFolder, tmp_path: Path, flower_task: None) -> None:
    rogue = init(tmp_path / "rogue", nodes=1, sans="localhost")
    data = small_dataset(tmp_path, "generation", rows=12)
    port = served.cfg.sfprompt.body_port
    foreign = device_copy(certs, "node-1", tmp_path / "d", rogue)  # the right ca.crt, another CA's tls.crt
    tls, extra, reason = {
        "foreign device certificate": (DeviceTls(foreign, "node-1", "localhost"), {},
                                       f"body service at localhost:{port} answered"),
        "no device files": (DeviceTls(certs.path, "node-9", "localhost"), {},
                            "nodes/node-9/tls.crt and tls.key"),
        "wrong server name": (DeviceTls(certs.path, "node-1", "127.0.0.2"), {},  # not among the SANs
                              f"body service at 127.0.0.2:{port} answered"),
        "no identity": (None, {}, "sfprompt.certs: '' is not allowed; a device needs its own certificate"),
        "half an identity": (None, {"certs": str(certs.path)}, "node config: node-name is missing"),
    }[case]
    start = time.monotonic()
    reply = app.train(served.instruction(), device_context(data, tls, run_id=802, **extra))
    assert reply.has_error() and reason in reply.error.reason, reply.error.reason
    assert "\n" not in reply.error.reason and time.monotonic() - start < 30
    print(f"\n{case}: {reply.error.reason}")
    assert served.strategy.service.sessions() == []


@pytest.mark.parametrize(("settings", "message"), [
    (["sfprompt.certs=/nowhere"], "sfprompt.certs: '/nowhere' is not allowed; `pollinate serve` sets it "
                                  "together with sfprompt.body-address"),
    (["sfprompt.body-address=0.0.0.0:9095", "sfprompt.certs=/nowhere"],
     "sfprompt.certs: '/nowhere' is not allowed; it must be a folder of `pollinate certs init` (server.crt"),
    (["sfprompt.body-address=somewhere", "sfprompt.certs=/nowhere"],
     "sfprompt.body-address: 'somewhere' is not HOST:PORT"),
    (["sfprompt.body-port=0"], "sfprompt.body-port: 0 is not allowed; give a TCP port from 1 to 65535"),
    (["sfprompt.body-port=70000"], "sfprompt.body-port: 70000 is not allowed"),
])
def test_bad_service_settings_get_one_line(simulate_error: Any, settings: list[str], message: str) -> None:
    base = ["strategy=sfprompt", "model=minilm-l6", "task=classification"]
    assert message in simulate_error([a for s in [*base, *settings] for a in ("--set", s)])


def test_serve_refuses_a_body_port_it_cannot_listen_on(
        certs: CertFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from pollinate.cli import main

    deep_tiny(monkeypatch)
    data = small_dataset(tmp_path, "generation")
    link = free_port()
    base = ["serve", "--certs", str(certs.path), "--address", f"127.0.0.1:{link}", "--state",
            str(tmp_path / "state"), "--set", "model=tiny-llama", "strategy=sfprompt", f"dataset={data}"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for port, line in ((taken.getsockname()[1], "cannot listen on 127.0.0.1:"),
                           (link, "it is the SuperLink's port (--address)")):
            assert main([*base, f"sfprompt.body-port={port}"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert err.startswith("pollinate: error: sfprompt.body-port: "), err
            assert line in err
    assert not (tmp_path / "state").exists()  # nothing was started or written
