"""The certificate folder of a deployment (pollinate.deploy.certs): files, keys, SANs, permissions,
refusal to overwrite, and a real mutual-TLS handshake with what it made."""

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pollinate.cli import main
from pollinate.deploy.certs import CertFolder, add_node, init


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> CertFolder:
    return init(tmp_path_factory.mktemp("deploy") / "certs", nodes=3,
                sans="localhost,127.0.0.1,fl.example.org")


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_and_permissions(folder: CertFolder) -> None:
    assert folder.nodes() == ["node-1", "node-2", "node-3"]
    private = [folder.ca_key, folder.server_key]
    for name in folder.nodes():
        files = folder.node(name)
        private += [files.auth_key, files.tls_key]
        assert files.auth_pub.is_file() and files.tls_crt.is_file()
        assert stat.S_IMODE(files.folder.stat().st_mode) == 0o700
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700
    assert not [p for p in folder.path.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_server_certificate_names_the_sans_and_chains_to_the_ca(folder: CertFolder) -> None:
    ca, server = cert(folder.ca_crt), cert(folder.server_crt)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_key_types(folder: CertFolder) -> None:
    for path in (folder.ca_key, folder.server_key, folder.node("node-1").tls_key):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    node = folder.node("node-2")
    auth = serialization.load_ssh_private_key(node.auth_key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(node.auth_pub.read_bytes())
    assert isinstance(auth, ec.EllipticCurvePrivateKey) and auth.curve.name == "secp384r1"
    assert node.auth_pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert public.public_numbers() == auth.public_key().public_numbers()  # type: ignore[union-attr]
    client = cert(node.tls_crt)
    client.verify_directly_issued_by(cert(folder.ca_crt))
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    keys = {folder.node(n).auth_pub.read_text() for n in folder.nodes()}
    assert len(keys) == 3  # every device its own key


def test_never_overwrites(folder: CertFolder, tmp_path: Path) -> None:
    before = folder.ca_key.read_bytes()
    with pytest.raises(ValueError, match=r"^--out: .* already exists; certificates are never overwritten"):
        init(folder.path, nodes=1, sans="localhost")
    with pytest.raises(ValueError, match=r"^NAME: 'node-1' already has keys"):
        add_node(folder.path, "node-1")
    assert folder.ca_key.read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        init(empty, nodes=1, sans="localhost")


def test_add_node_signs_with_the_folders_ca(tmp_path: Path) -> None:
    made = init(tmp_path / "c", nodes=0, sans="localhost")
    assert made.nodes() == []
    files = add_node(made.path, "phone-7")
    assert made.nodes() == ["phone-7"]
    cert(files.tls_crt).verify_directly_issued_by(cert(made.ca_crt))
    assert stat.S_IMODE(files.auth_key.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match=r"^NAME: '\.\./x' is not allowed"):
        add_node(made.path, "../x")
    made.ca_key.unlink()
    with pytest.raises(ValueError, match="has no ca.key"):
        add_node(made.path, "phone-8")
    with pytest.raises(ValueError, match=r"^--certs: .* is not a certificate folder \(ca.crt is missing\)"):
        add_node(tmp_path / "nowhere", "x")


@pytest.mark.parametrize(("args", "line"), [
    (["--san", "bad host"], "--san: 'bad host' is neither a host name nor an IP address"),
    (["--san", ","], "--san: give the host names"),
    (["--san", "localhost", "--nodes", "-1"], "--nodes: -1 is not allowed"),
    (["--san", "localhost", "--days", "0"], "--days: 0 is not allowed"),
])
def test_bad_input_is_one_line(args: list[str], line: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", "--out", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pollinate: error: {err.removeprefix('pollinate: error: ')}" and line in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "c").exists()


def handshake(folder: CertFolder, client: ssl.SSLContext) -> str | None:
    """A TLS server on loopback with the folder's server certificate, requiring a client certificate
    from the folder's CA; None when ``client`` connects, else why it failed."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder.server_crt, folder.server_key)
    server.load_verify_locations(folder.ca_crt)
    server.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client.wrap_socket(raw, server_hostname="localhost") as tls:
            return None if tls.recv(2) == b"ok" else "no data"
    except (ssl.SSLError, OSError) as error:
        return type(error).__name__
    finally:
        thread.join(5)
        listener.close()


def test_mutual_tls_with_the_folders_certificates(folder: CertFolder, tmp_path: Path) -> None:
    def context(ca: Path, node: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca))
        if node is not None:
            files = folder.node(node)
            ctx.load_cert_chain(files.tls_crt, files.tls_key)
        return ctx

    assert handshake(folder, context(folder.ca_crt, "node-1")) is None
    assert handshake(folder, context(folder.ca_crt, None)) is not None  # no client certificate
    rogue = init(tmp_path / "rogue", nodes=1, sans="localhost")
    assert handshake(folder, context(rogue.ca_crt, "node-1")) is not None  # the server's CA is unknown
    stranger = ssl.create_default_context(cafile=str(folder.ca_crt))
    stranger.load_cert_chain(rogue.node("node-1").tls_crt, rogue.node("node-1").tls_key)
    assert handshake(folder, stranger) is not None  # a client certificate from another CA
