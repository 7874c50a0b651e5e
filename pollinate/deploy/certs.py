"""The certificate folder of a deployment: one CA, the server's certificate, one key set per device.

::

    DIR/
      ca.crt                    the CA every party trusts (devices get a copy)
      ca.key                    the CA's private key: stays with the operator (``certs add-node`` needs it)
      server.crt, server.key    the SuperLink's certificate, also the split-learning body service's (its SANs)
      nodes/<name>/auth.key     the SuperNode's node-authentication key: EC P-384, OpenSSH format
      nodes/<name>/auth.pub     its public half, registered with the SuperLink
      nodes/<name>/tls.crt      the device's client certificate for the body service's mutual TLS
      nodes/<name>/tls.key
      certs.json                what the folder holds (SANs, nodes, validity)

Private keys are written 0600 in folders of 0700. A folder is made whole in a temporary sibling and then
renamed, so an existing one is never overwritten and a failed ``init`` leaves nothing half made.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1
"""EC P-384: what Flower's node authentication takes, and a TLS curve every gRPC build speaks."""
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MANIFEST = "certs.json"


@dataclass(frozen=True)
class NodeFiles:
    """The files of one device."""

    folder: Path

    @property
    def auth_key(self) -> Path:
        return self.folder / "auth.key"

    @property
    def auth_pub(self) -> Path:
        return self.folder / "auth.pub"

    @property
    def tls_crt(self) -> Path:
        return self.folder / "tls.crt"

    @property
    def tls_key(self) -> Path:
        return self.folder / "tls.key"


@dataclass(frozen=True)
class CertFolder:
    """A certificate folder made by :func:`init`."""

    path: Path

    @property
    def ca_crt(self) -> Path:
        return self.path / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.path / "ca.key"

    @property
    def server_crt(self) -> Path:
        return self.path / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.path / "server.key"

    def node(self, name: str) -> NodeFiles:
        return NodeFiles(self.path / "nodes" / name)

    def nodes(self) -> list[str]:
        """The devices the folder holds keys for, by name."""
        folder = self.path / "nodes"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    @classmethod
    def open(cls, path: Path) -> CertFolder:
        """An existing folder, or the one-line error that says what is missing."""
        folder = cls(Path(path))
        for needed in (folder.ca_crt, folder.server_crt, folder.server_key):
            if not needed.is_file():
                raise ValueError(f"--certs: {str(path)!r} is not a certificate folder ({needed.name} is "
                                 "missing); make one with `pollinate certs init`")
        return folder


@dataclass(frozen=True)
class DeviceTls:
    """A device's own side of the mutual TLS of a service the server runs besides Flower (SFPrompt's body
    service), as ``pollinate agent`` passes it to the ClientApp in the node config.

    The device trusts ``folder/ca.crt`` and presents ``folder/nodes/<node>/tls.crt``; it dials the server
    by ``server_host``, the host of its ``--superlink``: the server certificate names it, or the
    SuperLink's TLS would have refused the device already. A path the server sends is never used: it
    names a folder on the server.
    """

    folder: Path
    node: str
    server_host: str

    def address(self, port: int) -> str:
        """``host:port`` of a service of the server on ``port``, as this device dials it."""
        host = self.server_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_sans(text: str) -> list[x509.GeneralName]:
    """``"localhost,10.0.0.5,fl.example.org"`` -> DNS names and IP addresses (the one-line error for none)."""
    names: list[x509.GeneralName] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", item):
                raise ValueError(f"--san: {item!r} is neither a host name nor an IP address") from None
            names.append(x509.DNSName(item))
    if not names:
        raise ValueError("--san: give the host names or addresses devices use to reach the server, e.g. "
                         "--san localhost,127.0.0.1,fl.example.org")
    return names


def init(out: Path, nodes: int, sans: str, days: int = 365) -> CertFolder:
    """Make a new certificate folder at ``out`` with ``nodes`` devices named node-1, node-2, ..."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"--out: {str(out)!r} already exists; certificates are never overwritten (give a "
                         "new folder, or add devices with `pollinate certs add-node`)")
    if nodes < 0:
        raise ValueError(f"--nodes: {nodes} is not allowed; give 0 or more devices")
    if days < 1:
        raise ValueError(f"--days: {days} is not allowed; certificates must be valid for at least one day")
    names = parse_sans(sans)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        folder = CertFolder(work)
        ca_key = ec.generate_private_key(CURVE())
        ca = _certificate(_name("pollinate CA"), ca_key.public_key(), _name("pollinate CA"), ca_key,
                          days=10 * days, ca=True)
        _write(folder.ca_crt, ca.public_bytes(serialization.Encoding.PEM))
        _write_key(folder.ca_key, ca_key)
        server_key = ec.generate_private_key(CURVE())
        server = _certificate(_name("pollinate server"), server_key.public_key(), ca.subject, ca_key,
                              days=days, sans=names, usage=ExtendedKeyUsageOID.SERVER_AUTH)
        _write(folder.server_crt, server.public_bytes(serialization.Encoding.PEM))
        _write_key(folder.server_key, server_key)
        for i in range(1, nodes + 1):
            _make_node(folder, f"node-{i}", ca, ca_key, days)
        _write(work / MANIFEST, json.dumps({
            "sans": [str(n.value) for n in names], "days": days, "curve": "P-384",
            "created": _now().isoformat(timespec="seconds")}, indent=2).encode() + b"\n")
        work.chmod(0o700)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return CertFolder(out)


def add_node(path: Path, name: str, days: int | None = None) -> NodeFiles:
    """Add device ``name`` to an existing folder (its CA signs the new client certificate)."""
    folder = CertFolder.open(path)
    if not NODE_NAME.match(name):
        raise ValueError(f"NAME: {name!r} is not allowed; use letters, digits, '.', '_' and '-' (up to 63)")
    if not folder.ca_key.is_file():
        raise ValueError(f"{str(path)!r} has no ca.key: add devices where the CA's key is kept")
    if folder.node(name).folder.exists():
        raise ValueError(f"NAME: {name!r} already has keys in {str(path)!r}; keys are never overwritten")
    ca = x509.load_pem_x509_certificate(folder.ca_crt.read_bytes())
    ca_key = serialization.load_pem_private_key(folder.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{folder.ca_key}: not an EC private key")
    manifest = json.loads((folder.path / MANIFEST).read_text()) if (folder.path / MANIFEST).is_file() else {}
    return _make_node(folder, name, ca, ca_key, days or int(manifest.get("days", 365)))


def _make_node(folder: CertFolder, name: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
               days: int) -> NodeFiles:
    files = folder.node(name)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_mkdir(folder.path / "nodes")))
    try:
        staged = NodeFiles(work)
        auth = ec.generate_private_key(CURVE())
        openssh = auth.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption())
        _write(staged.auth_key, openssh, private=True)
        _write(staged.auth_pub, auth.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                               serialization.PublicFormat.OpenSSH) + b"\n")
        tls_key = ec.generate_private_key(CURVE())
        cert = _certificate(_name(name), tls_key.public_key(), ca.subject, ca_key, days=days,
                            usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        _write(staged.tls_crt, cert.public_bytes(serialization.Encoding.PEM))
        _write_key(staged.tls_key, tls_key)
        work.chmod(0o700)
        work.rename(files.folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return files


def _mkdir(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pollinate"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _certificate(subject: x509.Name, public: ec.EllipticCurvePublicKey, issuer: x509.Name,
                 signer: ec.EllipticCurvePrivateKey, *, days: int, ca: bool = False,
                 sans: list[x509.GeneralName] | None = None,
                 usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    start = _now() - datetime.timedelta(minutes=5)  # a little slack for clocks that differ
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signer, hashes.SHA384())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), private=True)
