from __future__ import annotations

import dataclasses
import hashlib
import json
import stat
from pathlib import Path

import pytest

from protocol.manifest import (
    Manifest,
    ManifestError,
    ModelFile,
    SignedManifest,
    manifest_to_json,
    parse_manifest,
)
from protocol.signing import (
    SigningKeyError,
    generate_keypair,
    load_private_key,
    load_public_key,
    parse_public_key,
    sign_manifest,
    verify_bundle,
    verify_signature,
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


def test_keygen_writes_a_private_key_only_its_owner_can_read(keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert load_public_key(public).keyid == parse_public_key(public.read_text()).keyid


def test_keygen_never_replaces_an_existing_key(keys: tuple[Path, Path]) -> None:
    private, _ = keys
    before = private.read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keypair(private.parent)
    assert private.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\nxx\n"])
def test_bad_key_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(SigningKeyError):
        load_private_key(path)
    with pytest.raises(SigningKeyError):
        load_public_key(path)


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match=r"cannot read key .*nope\.key"):
        load_private_key(tmp_path / "nope.key")


def test_signature_verifies_with_the_matching_key(
    manifest: Manifest, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    signed = sign_manifest(manifest, load_private_key(private))
    trusted = load_public_key(public)
    assert verify_signature(signed, [trusted]).keyid == trusted.keyid
    # and still after the file round trip
    again = parse_manifest(manifest_to_json(signed))
    assert verify_signature(again, [trusted]).keyid == trusted.keyid


def test_any_change_to_the_manifest_breaks_the_signature(
    manifest: Manifest, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    signed = sign_manifest(manifest, load_private_key(private))
    changed = dataclasses.replace(manifest, labels=("cat", "dog"))
    with pytest.raises(ManifestError, match="does not verify"):
        verify_signature(SignedManifest(changed, signed.signatures), [load_public_key(public)])


def test_unsigned_and_untrusted_manifests_are_refused(
    manifest: Manifest, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    with pytest.raises(ManifestError, match="not signed"):
        verify_signature(SignedManifest(manifest), [load_public_key(public)])
    _, other_public = generate_keypair(tmp_path / "other")
    signed = sign_manifest(manifest, load_private_key(private))
    with pytest.raises(ManifestError, match="none of which is trusted"):
        verify_signature(signed, [load_public_key(other_public)])


def test_garbage_signature_value_is_refused(manifest: Manifest, keys: tuple[Path, Path]) -> None:
    private, public = keys
    signed = sign_manifest(manifest, load_private_key(private))
    bad = dataclasses.replace(signed.signatures[0], value="!!notbase64!!")
    with pytest.raises(ManifestError, match="does not verify"):
        verify_signature(SignedManifest(manifest, (bad,)), [load_public_key(public)])


def _bundle(tmp_path: Path, manifest: Manifest, private: Path, model: bytes) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.tflite").write_bytes(model)
    described = dataclasses.replace(
        manifest,
        model=ModelFile("model.tflite", hashlib.sha256(model).hexdigest(), len(model)),
    )
    signed = sign_manifest(described, load_private_key(private))
    (bundle / "manifest.json").write_bytes(manifest_to_json(signed))
    return bundle


def test_verify_bundle_checks_model_bytes(
    manifest: Manifest, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    bundle = _bundle(tmp_path, manifest, private, b"TFL3" * 100)
    trusted = [load_public_key(public)]
    verify_bundle(bundle, trusted)

    (bundle / "model.tflite").write_bytes(b"TFL3" * 99 + b"TFL4")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        verify_bundle(bundle, trusted)
    (bundle / "model.tflite").write_bytes(b"TFL3" * 101)
    with pytest.raises(ManifestError, match="404 bytes but the manifest says 400"):
        verify_bundle(bundle, trusted)
    (bundle / "model.tflite").unlink()
    with pytest.raises(ManifestError, match="cannot read"):
        verify_bundle(bundle, trusted)


def test_manifest_edited_on_disk_is_refused(
    manifest: Manifest, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    bundle = _bundle(tmp_path, manifest, private, b"TFL3" * 100)
    data = json.loads((bundle / "manifest.json").read_text())
    data["manifest"]["validation"]["tflite_accuracy"] = 0.999
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="does not verify"):
        verify_bundle(bundle, [load_public_key(public)])
