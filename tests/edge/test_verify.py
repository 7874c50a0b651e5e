"""The runner refuses what does not verify: tampered files and manifests, wrong keys, foreign adapters."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pollinate.edge import manifest as mf
from pollinate.edge.adapters import export_adapter
from pollinate.edge.bundle_pb2 import AdapterManifest, SignedManifest
from pollinate.edge.runtime import EdgeModel


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(private key, its public key, an unrelated public key)."""
    folder = tmp_path_factory.mktemp("keys")
    private, public = mf.generate_keys(folder / "edge")
    _, other = mf.generate_keys(folder / "other")
    return private, public, other


@pytest.fixture
def signed(tmp_path: Path, separate_bundle: Path, round2_adapter: Path,
           keys: tuple[Path, Path, Path]) -> tuple[Path, Path]:
    """A signed copy of the separate bundle and a signed round-2 adapter for it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(separate_bundle, bundle)
    manifest, _ = mf.read_bundle_manifest(bundle)
    mf.write_bundle_manifest(bundle, manifest, mf.load_private_key(keys[0]))
    adapter = tmp_path / round2_adapter.name
    shutil.copy(round2_adapter, adapter)
    adapter_manifest, _ = mf.read_adapter_manifest(round2_adapter)
    mf.write_adapter_manifest(adapter, adapter_manifest.adapter, mf.load_private_key(keys[0]))
    return bundle, adapter


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_signed_bundle_and_adapter_verify(signed: tuple[Path, Path], keys: tuple[Path, Path, Path]) -> None:
    bundle, adapter = signed
    model = EdgeModel(bundle, public_key=keys[1], adapter=adapter)
    assert model.verified.signature_checked
    assert model.verified.key_id == mf.key_id(mf.load_public_key(keys[1]))
    assert model.adapter is not None and model.adapter.round == 2


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "adapters/round-0001.onnx_adapter"])
def test_a_tampered_file_is_refused(signed: tuple[Path, Path], keys: tuple[Path, Path, Path],
                                    name: str) -> None:
    bundle, _ = signed
    _flip_byte(bundle / name)
    with pytest.raises(mf.VerificationError, match=f"file {name} does not match its SHA-256"):
        EdgeModel(bundle, public_key=keys[1])
    with pytest.raises(mf.VerificationError):  # hashes are checked even without a key
        EdgeModel(bundle)


def test_a_missing_file_is_refused(signed: tuple[Path, Path]) -> None:
    bundle, _ = signed
    (bundle / "chat_template.jinja").unlink()
    with pytest.raises(mf.VerificationError, match="file chat_template.jinja is missing"):
        EdgeModel(bundle)


def test_a_tampered_manifest_is_refused(signed: tuple[Path, Path], keys: tuple[Path, Path, Path]) -> None:
    """Raise the generation default in the signed payload: the signature no longer verifies."""
    bundle, _ = signed
    envelope = SignedManifest.FromString((bundle / mf.MANIFEST_FILE).read_bytes())
    manifest, _ = mf.read_bundle_manifest(bundle)
    manifest.generation.max_new_tokens = 4096
    envelope.payload = manifest.SerializeToString()
    (bundle / mf.MANIFEST_FILE).write_bytes(envelope.SerializeToString())
    with pytest.raises(mf.VerificationError, match="signature does not verify"):
        EdgeModel(bundle, public_key=keys[1])


def test_a_corrupt_manifest_is_refused(signed: tuple[Path, Path]) -> None:
    bundle, _ = signed
    (bundle / mf.MANIFEST_FILE).write_bytes(b"\xff\xff not a protobuf")
    with pytest.raises(mf.VerificationError, match="manifest is corrupt"):
        EdgeModel(bundle)


def test_the_wrong_key_is_refused(signed: tuple[Path, Path], keys: tuple[Path, Path, Path]) -> None:
    bundle, adapter = signed
    with pytest.raises(mf.VerificationError, match="signed by key [0-9a-f]{16}, not by the given public key"):
        EdgeModel(bundle, public_key=keys[2])
    with pytest.raises(mf.VerificationError, match="not by the given public key"):
        mf.read_adapter_manifest(adapter, mf.load_public_key(keys[2]))


def test_an_unsigned_bundle_is_refused_when_a_key_is_required(separate_bundle: Path,
                                                              keys: tuple[Path, Path, Path]) -> None:
    with pytest.raises(mf.VerificationError, match="manifest is not signed, but a public key was given"):
        EdgeModel(separate_bundle, public_key=keys[1])


def test_a_tampered_adapter_is_refused(signed: tuple[Path, Path], keys: tuple[Path, Path, Path]) -> None:
    bundle, adapter = signed
    _flip_byte(adapter)
    model = EdgeModel(bundle, public_key=keys[1])
    with pytest.raises(mf.VerificationError, match="does not match its SHA-256"):
        model.load_adapter(adapter)


def test_an_adapter_without_its_manifest_is_refused(signed: tuple[Path, Path]) -> None:
    bundle, adapter = signed
    mf.adapter_manifest_path(adapter).unlink()
    with pytest.raises(mf.VerificationError, match="has no manifest"):
        EdgeModel(bundle, adapter=adapter)


def test_an_adapter_for_another_base_is_refused(signed: tuple[Path, Path],
                                                keys: tuple[Path, Path, Path]) -> None:
    """Signed by the trusted key, intact, but made for other base weights."""
    bundle, adapter = signed
    message = AdapterManifest()
    message.ParseFromString(mf.read_adapter_manifest(adapter)[1].payload)
    entry = message.adapter
    entry.base_weights_sha256 = "0" * 64
    mf.write_adapter_manifest(adapter, entry, mf.load_private_key(keys[0]))
    with pytest.raises(mf.VerificationError, match="made for base weights 0{16}.*belongs to another base"):
        EdgeModel(bundle, public_key=keys[1], adapter=adapter)


def test_an_adapter_manifest_is_no_bundle_manifest(signed: tuple[Path, Path]) -> None:
    """A signed adapter manifest put in place of the bundle's is refused by its payload type."""
    bundle, adapter = signed
    shutil.copy(mf.adapter_manifest_path(adapter), bundle / mf.MANIFEST_FILE)
    with pytest.raises(mf.VerificationError, match="expected pollinate.edge.v1.BundleManifest"):
        EdgeModel(bundle)


def test_export_adapter_signs_and_keys_are_never_overwritten(tmp_path: Path, gen_run: Path,
                                                             separate_bundle: Path,
                                                             keys: tuple[Path, Path, Path]) -> None:
    path = export_adapter(gen_run / "checkpoints" / "round-0002", separate_bundle, tmp_path / "r2",
                          sign_key=keys[0])
    assert path.name == "r2.onnx_adapter"
    _, verified = mf.read_adapter_manifest(path, mf.load_public_key(keys[1]))
    assert verified.signed and verified.signature_checked
    with pytest.raises(ValueError, match="exists; keys are never overwritten"):
        mf.generate_keys(keys[0].with_suffix(""))
