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
