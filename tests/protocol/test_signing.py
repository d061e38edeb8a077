from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.manifest import (
    Manifest,
    ManifestError,
    ModelFile,
    SignedManifest,
    manifest_to_json,
    parse_manifest,
)
from protocol.signing import (
    ED25519_SPKI_PREFIX,
    SigningKeyError,
    TrustedKey,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    parse_public_key,
    public_key_pem,
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


# --- public keys, parsed by hand ---------------------------------------------------------


def _spki_pem(der: bytes, label: str = "PUBLIC KEY") -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode(), b""]
    )


def test_the_hand_parser_agrees_with_cryptography() -> None:
    for _ in range(50):
        key = Ed25519PrivateKey.generate().public_key()
        pem = public_key_pem(key)
        loaded = serialization.load_pem_public_key(pem)
        assert isinstance(loaded, type(key))
        raw = key.public_bytes_raw()
        for variant in (pem, pem.decode(), pem.replace(b"\n", b"\r\n"), b"\n  " + pem + b"\n\n"):
            trusted = parse_public_key(variant)
            assert trusted.raw == raw == loaded.public_bytes_raw()
            # The key id is unchanged, so pinned keys and signed manifests keep theirs.
            assert trusted.keyid == key_id(key) == hashlib.sha256(raw).hexdigest()


def test_a_trusted_key_is_its_raw_bytes_and_their_id() -> None:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert TrustedKey.from_raw(raw) == TrustedKey(hashlib.sha256(raw).hexdigest(), raw)
    with pytest.raises(SigningKeyError, match="32 raw bytes"):
        TrustedKey.from_raw(raw[:31])
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(SigningKeyError, match="is not the sha256 of the key"):
        TrustedKey(key_id(other), raw)


@pytest.mark.parametrize(
    ("private", "named"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "an RSA key"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "an EC key"),
        (ed448.Ed448PrivateKey.generate, "an Ed448 key"),
        (x25519.X25519PrivateKey.generate, "an X25519 key"),
    ],
)
def test_other_kinds_of_public_key_are_refused_by_name(
    private: Callable[[], Any], named: str
) -> None:
    key = private().public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(
        SigningKeyError, match=rf"^release.pub is not an Ed25519 key \(it is {named}\)$"
    ):
        parse_public_key(pem, "release.pub")


_GOOD = public_key_pem(Ed25519PrivateKey.generate().public_key())
_GOOD_DER = ED25519_SPKI_PREFIX + bytes(range(32))


def _noncanonical(pem: bytes) -> bytes:
    # 44 bytes of DER end in a group with 2 unused bits; setting one changes no byte.
    body = pem.splitlines()[1]
    last = body[-2:-1]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    bumped = alphabet[alphabet.index(last) | 1 : (alphabet.index(last) | 1) + 1]
    assert bumped != last
    return pem.replace(body, body[:-2] + bumped + b"=")


def test_text_around_the_block_is_skipped_as_rfc_7468_allows() -> None:
    plain = parse_public_key(_GOOD)
    commented = parse_public_key(b"publisher: ci@example\n" + _GOOD + b"(rotated 2026)\n")
    assert commented == plain


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (b"", "is not a PEM public key: expected one block"),
        (_GOOD + _GOOD, "is not a PEM public key: expected one block"),
        (b"-----BEGIN CERTIFICATE-----\n" + _GOOD, "is not a PEM public key: expected one block"),
        (_GOOD.replace(b"PUBLIC KEY", b"RSA PUBLIC KEY"), "is not a PEM public key: expected"),
        (_GOOD.replace(b"-----\nMC", b"-----\nM!"), "the base64 inside is malformed"),
        (_GOOD.replace(b"=\n", b"\n"), "the base64 inside is malformed"),
        (_noncanonical(_GOOD), "the base64 inside is not canonical"),
        (_spki_pem(b"\x30\x03\x02\x01\x00"), "is not a PEM public key: its contents are not"),
        (_spki_pem(_GOOD_DER + b"\x00"), "is not a PEM public key: its contents are not"),
        (_spki_pem(_GOOD_DER[:-1]), "is not a PEM public key: its contents are not"),
        (_spki_pem(b"not der at all"), "is not a PEM public key: its contents are not"),
        # A well-formed SubjectPublicKeyInfo for Ed25519 whose key is 31 bytes.
        (
            _spki_pem(bytes.fromhex("3029300506032b6570032000") + bytes(31)),
            "is not an Ed25519 key: it is 43 bytes of DER",
        ),
        # ... and one with parameters, which RFC 8410 forbids.
        (
            _spki_pem(bytes.fromhex("302c300706032b65700500032100") + bytes(32)),
            "is not an Ed25519 key: it is 46 bytes of DER",
        ),
    ],
)
def test_corrupted_public_keys_are_refused(pem: bytes, message: str) -> None:
    # Stricter than cryptography, which skips text around the block and a second block.
    with pytest.raises(SigningKeyError, match=message):
        parse_public_key(pem)


def test_a_private_key_file_is_not_a_public_key(keys: tuple[Path, Path]) -> None:
    private, _ = keys
    with pytest.raises(SigningKeyError, match=r"signing\.key is not a PEM public key"):
        load_public_key(private)


def test_parsing_keys_and_checking_files_do_not_load_cryptography(
    keys: tuple[Path, Path],
) -> None:
    # The agent pins keys and checks model bytes all the time; it must not pay for the
    # crypto library to do so (docs/agent.md).
    _, public = keys
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from protocol.signing import load_public_key, file_sha256\n"
        "load_public_key(Path(sys.argv[1]))\n"
        "file_sha256(Path(sys.argv[1]))\n"
        "crypto = ('cryptography', '_cffi_backend')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in crypto))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(public)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
