"""Ed25519 keys, manifest signatures, and the check that a model file is the one signed for.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) so that openssl and
other tools read them too. A key's id is the sha256 of its raw 32-byte public key, in hex.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.manifest import (
    MODEL_FILE,
    Manifest,
    ManifestError,
    Signature,
    SignedManifest,
    canonical_bytes,
    read_manifest,
)

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"


class SigningKeyError(ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


@dataclass(frozen=True)
class TrustedKey:
    keyid: str
    key: Ed25519PublicKey


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new key pair; refuses to overwrite, since losing a signing key is forever."""
    private_path = directory / PRIVATE_KEY_FILE
    public_path = directory / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SigningKeyError(
                f"{path} already exists; move it away first (keys are never replaced)"
            )
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = public_key_pem(private.public_key())
    # O_EXCL with mode 600: the private key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    raw = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key")
    return key


def parse_public_key(pem: bytes | str, source: str = "public key") -> TrustedKey:
    raw = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{source} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{source} is not an Ed25519 key")
    return TrustedKey(key_id(key), key)


def load_public_key(path: Path) -> TrustedKey:
    return parse_public_key(_read_key_file(path), str(path))


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read key {path}: {exc.strerror or exc}") from None


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    value = private_key.sign(canonical_bytes(manifest))
    signature = Signature(
        keyid=key_id(private_key.public_key()),
        algorithm="ed25519",
        value=base64.b64encode(value).decode("ascii"),
    )
    return SignedManifest(manifest=manifest, signatures=(signature,))


def verify_signature(signed: SignedManifest, trusted: Iterable[TrustedKey]) -> Signature:
    """Return the signature made by a trusted key, or raise ManifestError saying why not."""
    keys = {k.keyid: k.key for k in trusted}
    if not signed.signatures:
        raise ManifestError("manifest is not signed")
    payload = canonical_bytes(signed.manifest)
    for signature in signed.signatures:
        key = keys.get(signature.keyid)
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(signature.value, validate=True), payload)
        except (InvalidSignature, binascii.Error, ValueError):
            raise ManifestError(
                f"manifest signature by key {signature.keyid[:16]} does not verify: "
                "the manifest was changed after signing"
            ) from None
        return signature
    ids = ", ".join(s.keyid[:16] for s in signed.signatures)
    raise ManifestError(f"manifest is signed by key(s) {ids}, none of which is trusted")


def file_sha256(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def verify_model_file(manifest: Manifest, model_path: Path) -> None:
    """The model file must be exactly the bytes the manifest names."""
    try:
        sha256, size = file_sha256(model_path)
    except OSError as exc:
        raise ManifestError(f"cannot read {model_path}: {exc.strerror or exc}") from None
    if size != manifest.model.size:
        raise ManifestError(
            f"{model_path.name} is {size} bytes but the manifest says {manifest.model.size}"
        )
    if sha256 != manifest.model.sha256:
        raise ManifestError(
            f"{model_path.name} sha256 {sha256[:16]}… does not match the manifest's "
            f"{manifest.model.sha256[:16]}…: the model was changed"
        )


def verify_bundle(bundle: Path, trusted: Iterable[TrustedKey]) -> tuple[SignedManifest, Signature]:
    """Check a bundle folder: manifest schema, signature by a trusted key, model bytes."""
    signed = read_manifest(bundle)
    signature = verify_signature(signed, trusted)
    verify_model_file(signed.manifest, bundle / signed.manifest.model.path)
    return signed, signature


__all__ = [
    "MODEL_FILE",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "SigningKeyError",
    "TrustedKey",
    "file_sha256",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "public_key_pem",
    "sign_manifest",
    "verify_bundle",
    "verify_model_file",
    "verify_signature",
]
