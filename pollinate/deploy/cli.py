"""``pollinate certs init|add-node``: the certificates and keys of a deployment."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    """Add ``certs`` to the ``pollinate`` subparsers (``argparse`` ``_SubParsersAction``)."""
    certs = commands.add_parser(
        "certs", help="make the CA, server certificate and device keys of a deployment",
        description="Make the certificates and keys a deployment needs, with `cryptography` (no openssl): a "
                    "CA, the server's certificate (the SuperLink's and the split-learning body service's), "
                    "and per device a node-authentication key pair (EC P-384, OpenSSH) and a client "
                    "certificate for mutual TLS. Private keys are written 0600; nothing is overwritten.")
    actions = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="make a new certificate folder",
                              description="Make a new certificate folder with N devices (node-1 .. node-N).")
    init.add_argument("--out", type=Path, required=True, help="the new folder (must not exist)")
    init.add_argument("--nodes", type=int, default=0, help="devices to make keys for now (default 0)")
    init.add_argument("--san", required=True, metavar="HOST[,HOST...]",
                      help="host names and IP addresses devices use to reach the server, e.g. "
                           "localhost,127.0.0.1,fl.example.org")
    init.add_argument("--days", type=int, default=365, help="validity of the certificates (the CA: 10x)")
    init.set_defaults(func=_init)
    add = actions.add_parser("add-node", help="add one device to a certificate folder",
                             description="Make the keys of one more device, signed by the folder's CA.")
    add.add_argument("dir", type=Path, metavar="DIR", help="a folder made by `pollinate certs init`")
    add.add_argument("name", metavar="NAME", help="the device's name (letters, digits, '.', '_', '-')")
    add.set_defaults(func=_add)


def register_run(commands: Any) -> None:
    """Add ``serve`` and ``agent`` to the ``pollinate`` subparsers."""
    serve = commands.add_parser(
        "serve", help="run a federation server: a secured SuperLink and pollinate's app on it",
        description="Start a SuperLink with TLS, node authentication and a state database, register the "
                    "devices of the certificate folder, wait for num-clients of them, run pollinate's app "
                    "once (the same keys as `pollinate simulate`) and stop every process it started. "
                    "With strategy sfprompt the app's body service listens on the same host at "
                    "sfprompt.body-port (default 9095), with the folder's certificates: open that port too.")
    serve.add_argument("--certs", type=Path, required=True, help="a folder made by `pollinate certs init`")
    serve.add_argument("--config", type=Path, help="a TOML file of run-config keys")
    serve.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override run-config keys, e.g. --set rounds=5 num-clients=3")
    serve.add_argument("--address", default="0.0.0.0:9092", metavar="HOST:PORT",
                       help="where devices reach the SuperLink (default 0.0.0.0:9092)")
    serve.add_argument("--state", type=Path, default=Path("pollinate-state"),
                       help="the server's own files: Flower's database, logs (default ./pollinate-state)")
    serve.add_argument("--run-dir", help="where the run folder goes (default runs/<run-id>)")
    serve.add_argument("--wait", type=float, default=600.0,
                       help="seconds to wait for num-clients devices to come online (default 600)")
    serve.set_defaults(func=_serve)
    agent = commands.add_parser(
        "agent", help="run a client agent on a device: a SuperNode training on the device's own data",
        description="Start a SuperNode that authenticates with the device's key, trusts the federation's "
                    "CA, and whose ClientApp trains on FILE (JSON lines or CSV, the field names of a local "
                    "dataset) within the device's memory budget. The data never leaves the device.")
    agent.add_argument("--certs", type=Path, required=True,
                       help="a folder holding the federation's ca.crt (and, for split learning, this "
                            "device's nodes/<name>/tls.crt and tls.key)")
    agent.add_argument("--key", type=Path, required=True, help="this device's nodes/<name>/auth.key")
    agent.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server's address")
    agent.add_argument("--data", type=Path, required=True, help="this device's .jsonl or .csv data")
    agent.add_argument("--memory-budget", help="this device's memory budget, e.g. 1.5GB")
    agent.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="the data file's field names, e.g. --set prompt-field=question")
    agent.add_argument("--port", type=int, help="the SuperNode's local port (default: a free one)")
    agent.add_argument("--log", type=Path, help="write the SuperNode's output here instead of the terminal")
    agent.set_defaults(func=_agent)


def _serve(args: argparse.Namespace) -> int:
    from pollinate.cli import resolve_config
    from pollinate.deploy.serve import serve
    from pollinate.server.app import new_run_id
    from pollinate.server.tracking import build_tracker

    cfg = resolve_config(args.config, args.set, args.run_dir)
    cfg = cfg.replace(run_dir=str(cfg.resolved_run_dir(new_run_id()).resolve()))
    build_tracker(cfg)  # a missing tracking library or an unreachable server stops here, not in the app
    code = serve(cfg, args.certs, args.address, args.state, args.wait)
    print(f"run folder: {cfg.run_dir}" if code == 0 else f"the run ended with exit code {code}")
    return code


def _agent(args: argparse.Namespace) -> int:
    from pollinate.config import parse_assignments
    from pollinate.deploy.agent import agent

    return agent(args.certs, args.key, args.superlink, args.data, args.memory_budget,
                 parse_assignments(args.set), args.port, args.log)


def _init(args: argparse.Namespace) -> int:
    from pollinate.deploy.certs import init

    folder = init(args.out, args.nodes, args.san, args.days)
    print(f"certificates for {', '.join(folder.nodes()) or 'no devices yet'} in {folder.path}")
    print(f"  the server uses {folder.server_crt.name} and {folder.server_key.name}; every device gets "
          f"{folder.ca_crt.name} and its own nodes/<name>/ folder")
    print(f"  keep {folder.ca_key.name} with the operator: it signs devices added later")
    return 0


def _add(args: argparse.Namespace) -> int:
    from pollinate.deploy.certs import add_node

    files = add_node(args.dir, args.name)
    print(f"keys of {args.name} in {files.folder}: register {files.auth_pub.name} with the server, and give "
          f"the device this folder and ca.crt")
    return 0
