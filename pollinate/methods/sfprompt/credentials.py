"""Mutual-TLS credentials of the body service, from a pollinate certificate folder.

The folder is the one ``pollinate certs init`` makes (:mod:`pollinate.deploy.certs`): the server presents
``server.crt`` (its SANs name the addresses clients dial) and accepts only client certificates signed by
``ca.crt``; a device presents ``nodes/<name>/tls.crt`` and trusts only ``ca.crt``. Under ``pollinate
serve`` the server uses the deployment's folder and each device its own copy (``ca.crt`` and its
``nodes/<name>/``, :class:`pollinate.deploy.certs.DeviceTls`); a simulation makes a throw-away folder per
run with :func:`temporary_certs`, which server and clients on the one machine share.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from pollinate.deploy import certs

LOOPBACK_SANS = "localhost,127.0.0.1,::1"
"""The names a simulation's server certificate carries: clients on the same machine."""


def server_credentials(folder: Path | certs.CertFolder) -> grpc.ServerCredentials:
    """The server's side: present ``server.crt``, require a client certificate signed by ``ca.crt``."""
    cert_folder = certs.CertFolder.open(_path(folder))
    pair = (cert_folder.server_key.read_bytes(), cert_folder.server_crt.read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=cert_folder.ca_crt.read_bytes(),
                                       require_client_auth=True)


def client_credentials(folder: Path | certs.CertFolder, node: str) -> grpc.ChannelCredentials:
    """A device's side: present ``nodes/<node>/tls.crt``, trust only the folder's ``ca.crt``.

    A device's copy of the folder needs only ``ca.crt`` and its own ``nodes/<node>/``.
    """
    cert_folder = certs.CertFolder(_path(folder))
    files = cert_folder.node(node)
    for needed in (cert_folder.ca_crt, files.tls_crt, files.tls_key):
        if not needed.is_file():
            raise ValueError(f"node {node!r}: {str(needed)!r} is missing; the device needs ca.crt and its "
                             f"nodes/{node}/tls.crt and tls.key (`pollinate certs add-node`)")
    return grpc.ssl_channel_credentials(root_certificates=cert_folder.ca_crt.read_bytes(),
                                        private_key=files.tls_key.read_bytes(),
                                        certificate_chain=files.tls_crt.read_bytes())


@contextmanager
def temporary_certs(nodes: int = 1, sans: str = LOOPBACK_SANS) -> Iterator[certs.CertFolder]:
    """A fresh CA, a server certificate for ``sans`` and ``nodes`` client keys (node-1, ...), for one run.

    The folder lives in a private temporary directory and is deleted on exit, CA key included: nothing
    signed by it is trusted anywhere after the run.
    """
    parent = Path(tempfile.mkdtemp(prefix="pollinate-certs-"))
    try:
        # a day is plenty for a simulation; the CA itself is never reused
        yield certs.init(parent / "certs", nodes=nodes, sans=sans, days=1)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def port_of(address: str) -> int:
    """The port of ``host:port`` (``[v6]:port`` too), or the one-line error."""
    port = address.rpartition(":")[2]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"sfprompt.body-address: {address!r} is not allowed; give HOST:PORT")
    return int(port)


def _path(folder: Path | certs.CertFolder) -> Path:
    return folder.path if isinstance(folder, certs.CertFolder) else Path(folder)
