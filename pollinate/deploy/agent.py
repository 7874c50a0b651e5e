"""``pollinate agent``: a SuperNode on a device, authenticated by its key, trusting the federation's CA,
whose ClientApp trains on the device's own data file; stopped with everything it started, by PID.

The ClientApp learns what it needs of the device through the SuperNode's node config: the data file, its
field names, the budget, and the device's own TLS identity for a service of the server besides Flower
(SFPrompt's body): the certificate folder, the device's name (the folder of ``--key``) and the host of
``--superlink``, which the server certificate names.

Everything a user can get wrong is checked before the SuperNode starts, each with one line: the
certificate folder, the key, the data file and its fields, the budget, whether the SuperLink answers.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pollinate.client.budget import parse_size
from pollinate.client.node import NODE_FIELDS, TLS_KEYS
from pollinate.deploy.certs import CertFolder, DeviceTls
from pollinate.deploy.processes import Started, flower_env, script, stop_on_sigterm
from pollinate.deploy.serve import parse_address


def check_key(path: Path) -> None:
    """The one-line error unless ``path`` is a node key (EC P-384, OpenSSH), as ``certs`` makes."""
    if not path.is_file():
        raise ValueError(f"--key: {str(path)!r} does not exist; give the device's nodes/<name>/auth.key")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise ValueError(f"--key: {str(path)!r} is not a node key (an EC P-384 private key in OpenSSH "
                         "format, as `pollinate certs` writes to nodes/<name>/auth.key)")


def check_data(path: Path, fields: dict[str, str]) -> None:
    """The one-line error unless ``path`` is a .jsonl/.csv file holding the fields of a task."""
    from pollinate.data import CLASSIFICATION, GENERATION, Fields, load_dataset

    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"--data: {str(path)!r} is not an existing .jsonl or .csv file")
    named = Fields(**fields)
    reasons = []
    for task in (GENERATION, CLASSIFICATION):
        try:
            load_dataset(str(path), task, named)
            return
        except ValueError as error:
            reasons.append(str(error))
    raise ValueError(f"--data: {str(path)!r} has neither {named.prompt} and {named.response} (generation) "
                     f"nor {named.text} and {named.label} (classification): {reasons[0]}")


def in_child(check: Callable[..., None], *args: Any) -> None:
    """Run ``check`` in a short-lived child process, its error raised here: reading a data file loads
    torch and the tokenizers, and the agent, which then only supervises its SuperNode for days, would
    keep them resident (about 420 MB of its idle memory)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        child.submit(check, *args).result()


def check_reachable(host: str, port: int, timeout: float = 5.0) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as error:
        raise ValueError(f"--superlink: cannot reach {host}:{port} ({error.strerror or error}); is "
                         "`pollinate serve` running there, and is the port open to this device?") from None


def node_config(data: Path, budget: str | None, settings: dict[str, str],
                tls: DeviceTls | None = None) -> str:
    """The SuperNode's ``--node-config``: the data file, its field names, the budget, the TLS identity."""
    pairs = {"data-path": str(data.resolve()), **settings, **({"memory-budget": budget} if budget else {})}
    if tls is not None:
        pairs.update(zip(TLS_KEYS, (str(tls.folder.resolve()), tls.node, tls.server_host), strict=True))
    return " ".join(f'{k}="{v}"' for k, v in pairs.items())


def device_tls(certs: Path, key: Path, server_host: str) -> DeviceTls:
    """The device's identity: named by the folder of its key (``nodes/<name>/auth.key``); a line on
    stdout if that name has no client certificate in ``certs`` (split learning would be refused)."""
    tls = DeviceTls(certs.resolve(), key.resolve().parent.name, server_host)
    files = CertFolder(tls.folder).node(tls.node)
    if not (files.tls_crt.is_file() and files.tls_key.is_file()):
        print(f"note: {files.folder} has no tls.crt and tls.key: this device cannot take part in split "
              "learning (strategy sfprompt)", flush=True)
    return tls


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def agent(certs: Path, key: Path, superlink: str, data: Path, budget: str | None, settings: dict[str, str],
          port: int | None, log: Path | None) -> int:
    """Check, start the SuperNode, wait until it ends (or Ctrl-C); its exit code."""
    ca = certs / "ca.crt"
    if not ca.is_file():
        raise ValueError(f"--certs: {str(certs)!r} has no ca.crt; give the folder `pollinate certs` made (or "
                         "the copy of it the device got)")
    check_key(key)
    unknown = sorted(set(settings) - set(NODE_FIELDS))
    if unknown:
        raise ValueError(f"--set: {unknown[0]!r} is not a device setting; allowed: {', '.join(NODE_FIELDS)}")
    in_child(check_data, data, {NODE_FIELDS[k]: v for k, v in settings.items()})
    if budget:
        parse_size(budget, "--memory-budget")
    host, link_port = parse_address(superlink, "--superlink")
    check_reachable(host, link_port)
    home = Path(key).resolve().parent / ".flwr"
    home.mkdir(exist_ok=True)
    stop_on_sigterm()
    node = Started("the SuperNode", [
        script("flower-supernode"), "--root-certificates", str(ca), "--auth-supernode-private-key", str(key),
        "--superlink", superlink, "--port", str(port or free_port()),
        "--node-config", node_config(data, budget, settings, device_tls(certs, key, host))],
        flower_env(home), log)
    print(f"SuperNode started (PID {node.pid}), training on {data} for {superlink}", flush=True)
    try:
        while node.alive():
            time.sleep(0.5)
        return int(node.process.returncode or 0)
    finally:
        node.stop()
