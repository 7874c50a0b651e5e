"""Bundle and adapter manifests: hashing, Ed25519 signing and verification. No torch.

A bundle folder holds its files and ``manifest.pb``, a :class:`SignedManifest` around a serialised
:class:`BundleManifest` (``proto/bundle.proto``). An adapter shipped on its own is ``NAME.onnx_adapter``
plus ``NAME.onnx_adapter.manifest.pb`` around an :class:`AdapterManifest`. The signature covers the
exact payload bytes, so no canonical serialisation is needed: what was signed is what is stored.

Every check failure raises :class:`VerificationError` (a ``ValueError``) naming the file and what is
wrong, so the command line prints it as one line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from pollinate.edge.bundle_pb2 import (
    Adapter,
    AdapterManifest,
    BundleManifest,
    FileDigest,
    SignedManifest,
)
from pollinate.files import sha256_file  # the run folder's file hash; stdlib only

__all__ = [
    "ADAPTER_PAYLOAD",
    "BUNDLE_PAYLOAD",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "VerificationError",
    "Verified",
    "adapter_manifest_path",
    "digest",
    "generate_keys",
    "key_id",
    "load_private_key",
    "load_public_key",
    "pollinate_version",
    "read_adapter_manifest",
    "read_bundle_manifest",
    "sha256_file",
    "to_dict",
    "write_adapter_manifest",
    "write_bundle_manifest",
]

FORMAT_VERSION = 1
"""Version of the bundle layout; a runner refuses a bundle of a newer version."""
MANIFEST_FILE = "manifest.pb"
BUNDLE_PAYLOAD = "pollinate.edge.v1.BundleManifest"
ADAPTER_PAYLOAD = "pollinate.edge.v1.AdapterManifest"
ED25519 = "ed25519"
_DOMAIN = b"pollinate-edge-v1"  # signatures of other protocols never verify as ours


class VerificationError(ValueError):
    """A bundle or adapter whose files, manifest or signature do not check out."""


@dataclass(frozen=True)
class Verified:
    """What reading a signed manifest established."""

    payload: bytes
    signed: bool
    """Whether the envelope carries a signature at all."""
    key_id: str
    """The signer's key id as recorded in the envelope ('' when unsigned)."""
    signature_checked: bool
    """Whether the signature was verified against a trusted public key."""


# --------------------------------------------------------------------------------------------------
# Hashes and versions
# --------------------------------------------------------------------------------------------------


def digest(folder: Path, name: str) -> FileDigest:
    """The :class:`FileDigest` of ``folder / name``."""
    path = folder / name
    return FileDigest(name=name, sha256=sha256_file(path), size=path.stat().st_size)


def pollinate_version() -> str:
    """The installed pollinate version, or ``"unknown"`` when run from a bare source tree."""
    try:
        return importlib.metadata.version("pollinate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def to_dict(message: Any) -> dict[str, Any]:
    """A manifest message as a JSON-ready dict (enum names, every field shown)."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(prefix: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``PREFIX.key`` (PKCS#8 PEM, mode 0600) and ``PREFIX.pub``.

    Parameters
    ----------
    prefix : Path
        Path of the pair without suffix, e.g. ``keys/edge``.

    Returns
    -------
    tuple of Path
        The private and the public key files.

    Raises
    ------
    ValueError
        If either file exists already (a key is never overwritten).
    """
    private_path, public_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise ValueError(f"--out: {str(path)!r} exists; keys are never overwritten, choose another name")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM, unencrypted), or raise ValueError naming the file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"--sign-key: {str(path)!r} is not a readable unencrypted PEM private key "
                         f"({error}); make one with `pollinate keys generate`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"--sign-key: {str(path)!r} is not an Ed25519 key; "
                         "make one with `pollinate keys generate`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM), or raise ValueError naming the file."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"--public-key: {str(path)!r} is not a readable PEM public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"--public-key: {str(path)!r} is not an Ed25519 public key")
    return key


# --------------------------------------------------------------------------------------------------
# The signed envelope
# --------------------------------------------------------------------------------------------------


def _signed_bytes(payload_type: str, payload: bytes) -> bytes:
    """The bytes a signature covers: domain, type and payload, separated by zero bytes."""
    return b"\0".join([_DOMAIN, payload_type.encode(), payload])


def _envelope(payload_type: str, payload: bytes, key: Ed25519PrivateKey | None) -> bytes:
    """A serialised :class:`SignedManifest`, signed when ``key`` is given."""
    envelope = SignedManifest(payload_type=payload_type, payload=payload)
    if key is not None:
        envelope.signature_algorithm = ED25519
        envelope.key_id = key_id(key.public_key())
        envelope.signature = key.sign(_signed_bytes(payload_type, payload))
    return envelope.SerializeToString()


def _open_envelope(path: Path, payload_type: str, public_key: Ed25519PublicKey | None) -> Verified:
    """Read an envelope; check its type, and its signature when a trusted key is given."""
    try:
        envelope = SignedManifest.FromString(path.read_bytes())
    except OSError:
        raise VerificationError(f"{path}: manifest is missing or unreadable") from None
    except DecodeError:
        raise VerificationError(f"{path}: manifest is corrupt (not a SignedManifest)") from None
    if envelope.payload_type != payload_type:
        raise VerificationError(f"{path}: holds a {envelope.payload_type or 'untyped'} manifest, "
                                f"expected {payload_type}")
    signed = bool(envelope.signature)
    if public_key is not None:
        _check_signature(path, envelope, public_key)
    return Verified(envelope.payload, signed, envelope.key_id, public_key is not None)


def _check_signature(path: Path, envelope: SignedManifest, public_key: Ed25519PublicKey) -> None:
    """Raise VerificationError unless ``envelope`` is signed by ``public_key``."""
    if not envelope.signature:
        raise VerificationError(f"{path}: manifest is not signed, but a public key was given")
    if envelope.signature_algorithm != ED25519:
        raise VerificationError(f"{path}: signature algorithm {envelope.signature_algorithm!r} "
                                f"is not supported; expected {ED25519}")
    expected = key_id(public_key)
    try:
        public_key.verify(envelope.signature, _signed_bytes(envelope.payload_type, envelope.payload))
    except InvalidSignature:
        if envelope.key_id != expected:
            raise VerificationError(f"{path}: signed by key {envelope.key_id}, not by the given "
                                    f"public key {expected}") from None
        raise VerificationError(f"{path}: signature does not verify: the manifest was "
                                "modified after signing") from None


def _parse(message: Any, path: Path, payload: bytes) -> None:
    """Parse ``payload`` into ``message`` and check its format version."""
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise VerificationError(f"{path}: manifest payload is corrupt") from None
    if message.format_version != FORMAT_VERSION:
        raise VerificationError(f"{path}: format version {message.format_version} is not supported; "
                                f"this runner reads version {FORMAT_VERSION}")


def _check_file(folder: Path, entry: FileDigest, what: str) -> None:
    """Raise VerificationError unless ``folder / entry.name`` has the recorded size and SHA-256."""
    path = folder / entry.name
    if Path(entry.name).is_absolute() or ".." in Path(entry.name).parts:
        raise VerificationError(f"{what}: file name {entry.name!r} leaves the folder")
    if not path.is_file():
        raise VerificationError(f"{what}: file {entry.name} is missing")
    if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
        raise VerificationError(f"{what}: file {entry.name} does not match its SHA-256 in the "
                                "manifest (modified or corrupt)")


# --------------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------------


def write_bundle_manifest(folder: Path, manifest: BundleManifest,
                          key: Ed25519PrivateKey | None = None) -> None:
    """Hash every file of ``folder`` into ``manifest.files`` and write ``manifest.pb``, signed if ``key``.

    Files are listed in sorted order, named relative to ``folder`` with ``/`` separators.
    """
    del manifest.files[:]
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE)
    manifest.files.extend(digest(folder, name) for name in names)
    manifest.format_version = FORMAT_VERSION
    (folder / MANIFEST_FILE).write_bytes(_envelope(BUNDLE_PAYLOAD, manifest.SerializeToString(), key))


def read_bundle_manifest(folder: Path, public_key: Ed25519PublicKey | None = None,
                         check_files: bool = True) -> tuple[BundleManifest, Verified]:
    """Read and verify a bundle's manifest.

    Parameters
    ----------
    folder : Path
        The bundle folder.
    public_key : Ed25519PublicKey, optional
        The trusted key. When given, the manifest must carry a valid signature by it.
    check_files : bool, default True
        Check every listed file's size and SHA-256 (the graph of a 135M model: about a second).

    Returns
    -------
    manifest : BundleManifest
    verified : Verified

    Raises
    ------
    VerificationError
        On a missing or corrupt manifest, a bad signature, a wrong key, or a missing or
        modified file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VerificationError(f"{folder}: is not a bundle folder")
    path = folder / MANIFEST_FILE
    verified = _open_envelope(path, BUNDLE_PAYLOAD, public_key)
    manifest = BundleManifest()
    _parse(manifest, path, verified.payload)
    if check_files:
        for entry in manifest.files:
            _check_file(folder, entry, f"bundle {folder}")
    return manifest, verified


# --------------------------------------------------------------------------------------------------
# Adapters shipped on their own
# --------------------------------------------------------------------------------------------------


def adapter_manifest_path(adapter_file: Path) -> Path:
    """``NAME.onnx_adapter`` -> ``NAME.onnx_adapter.manifest.pb``."""
    return adapter_file.with_name(adapter_file.name + ".manifest.pb")


def write_adapter_manifest(adapter_file: Path, adapter: Adapter,
                           key: Ed25519PrivateKey | None = None) -> Path:
    """Record ``adapter_file``'s name, size and hash in ``adapter`` and write its signed manifest."""
    entry = digest(adapter_file.parent, adapter_file.name)
    adapter.file, adapter.sha256, adapter.size = entry.name, entry.sha256, entry.size
    manifest = AdapterManifest(format_version=FORMAT_VERSION, pollinate_version=pollinate_version())
    manifest.adapter.CopyFrom(adapter)
    path = adapter_manifest_path(adapter_file)
    path.write_bytes(_envelope(ADAPTER_PAYLOAD, manifest.SerializeToString(), key))
    return path


def read_adapter_manifest(adapter_file: Path, public_key: Ed25519PublicKey | None = None
                          ) -> tuple[AdapterManifest, Verified]:
    """Read and verify an adapter's manifest and the adapter file's hash.

    Raises
    ------
    VerificationError
        On a missing or corrupt manifest, a bad signature, a wrong key, or a modified file.
    """
    adapter_file = Path(adapter_file)
    path = adapter_manifest_path(adapter_file)
    if not path.is_file():
        raise VerificationError(f"{adapter_file}: has no manifest {path.name} beside it; make "
                                "adapters with `pollinate export CHECKPOINT --adapter-for BUNDLE`")
    verified = _open_envelope(path, ADAPTER_PAYLOAD, public_key)
    manifest = AdapterManifest()
    _parse(manifest, path, verified.payload)
    if manifest.adapter.file != adapter_file.name:
        raise VerificationError(f"{path}: describes {manifest.adapter.file!r}, not {adapter_file.name!r}")
    entry = FileDigest(name=adapter_file.name, sha256=manifest.adapter.sha256, size=manifest.adapter.size)
    _check_file(adapter_file.parent, entry, f"adapter {adapter_file}")
    return manifest, verified
