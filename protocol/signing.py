"""Ed25519 keys, manifest signatures, and the check that a model file is the one signed for.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) so that openssl and
other tools read them too. A key's id is the sha256 of its raw 32-byte public key, in hex.

`cryptography` is imported only inside the functions that make keys, sign or verify: the
edge agent holds and parses its pinned public keys all the time but verifies a signature
once per update, and the library (with the OpenSSL it bundles) is ~8 MiB resident that a
small device would otherwise carry for good. So public keys are parsed here by hand:
an Ed25519 SubjectPublicKeyInfo is a fixed 12-byte header followed by the 32 key bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.manifest import (
    MODEL_FILE,
    Manifest,
    ManifestError,
    Signature,
    SignedManifest,
    canonical_bytes,
    read_manifest,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"

ED25519_KEY_SIZE = 32
# DER of SEQUENCE { SEQUENCE { OID 1.3.101.112 (Ed25519) }, BIT STRING (0 unused bits) }
# up to the key: RFC 8410 allows no parameters, so every Ed25519 public key starts so.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")

_PEM_BEGIN = b"-----BEGIN PUBLIC KEY-----"
_PEM_END = b"-----END PUBLIC KEY-----"
_ED25519_OID = bytes.fromhex("2b6570")
# Named in the refusal, so that an operator who pasted the wrong key sees which it was.
_OTHER_ALGORITHMS = {
    bytes.fromhex("2a864886f70d010101"): "an RSA key",
    bytes.fromhex("2a8648ce3d0201"): "an EC key",
    bytes.fromhex("2a8648ce380401"): "a DSA key",
    bytes.fromhex("2b6571"): "an Ed448 key",
    bytes.fromhex("2b656e"): "an X25519 key",
    bytes.fromhex("2b656f"): "an X448 key",
}


class SigningKeyError(ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


@dataclass(frozen=True)
class TrustedKey:
    """A pinned publisher key as its raw 32 bytes (not a crypto library object, so that
    pinning keys costs no crypto library) and its id."""

    keyid: str
    raw: bytes

    def __post_init__(self) -> None:
        # Checked here so that a key handed over in pieces (to the agent's verifier child,
        # say) cannot pair one key's id with another key's bytes.
        if not isinstance(self.raw, bytes) or len(self.raw) != ED25519_KEY_SIZE:
            raise SigningKeyError(f"an Ed25519 public key is {ED25519_KEY_SIZE} raw bytes")
        if self.keyid != key_id(self.raw):
            raise SigningKeyError(f"key id {self.keyid[:16]} is not the sha256 of the key")

    @classmethod
    def from_raw(cls, raw: bytes) -> TrustedKey:
        return cls(key_id(raw), raw)


def key_id(public_key: Ed25519PublicKey | bytes) -> str:
    """The sha256 of the raw 32-byte public key, in hex; given the key or its raw bytes."""
    raw = public_key if isinstance(public_key, bytes) else public_key.public_bytes_raw()
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new key pair; refuses to overwrite, since losing a signing key is forever."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key")
    return key


def parse_public_key(pem: bytes | str, source: str = "public key") -> TrustedKey:
    """An Ed25519 public key from exactly one SubjectPublicKeyInfo PEM block, parsed
    without a crypto library (see the module's docstring)."""
    raw = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        der = _pem_public_key_der(raw)
    except ValueError as exc:
        raise SigningKeyError(f"{source} is not a PEM public key: {exc}") from None
    if len(der) == len(ED25519_SPKI_PREFIX) + ED25519_KEY_SIZE and der.startswith(
        ED25519_SPKI_PREFIX
    ):
        return TrustedKey.from_raw(der[len(ED25519_SPKI_PREFIX) :])
    try:
        algorithm = _spki_algorithm(der)
    except ValueError:
        raise SigningKeyError(
            f"{source} is not a PEM public key: its contents are not a SubjectPublicKeyInfo"
        ) from None
    if algorithm != _ED25519_OID:
        named = _OTHER_ALGORITHMS.get(algorithm) or f"algorithm {_dotted(algorithm)}"
        raise SigningKeyError(f"{source} is not an Ed25519 key (it is {named})")
    raise SigningKeyError(
        f"{source} is not an Ed25519 key: it is {len(der)} bytes of DER, not the "
        f"{len(ED25519_SPKI_PREFIX)}-byte Ed25519 header and {ED25519_KEY_SIZE} key bytes"
    )


def _pem_public_key_der(text: bytes) -> bytes:
    """The DER inside the one PUBLIC KEY block. Explanatory text around it is skipped, as
    RFC 7468 lets parsers do (and as OpenSSL does, so keys people already pasted with a
    comment keep working); a second block, or anything inside that is not base64, is
    refused."""
    lines = [line.strip() for line in text.splitlines()]
    if (
        sum(line.startswith(b"-----BEGIN") for line in lines) != 1
        or lines.count(_PEM_BEGIN) != 1
        or lines.count(_PEM_END) != 1
    ):
        raise ValueError(
            "expected one block from -----BEGIN PUBLIC KEY----- to -----END PUBLIC KEY-----"
        )
    begin, end = lines.index(_PEM_BEGIN), lines.index(_PEM_END)
    if end < begin + 2:
        raise ValueError("the PUBLIC KEY block is empty or ends before it begins")
    lines = lines[begin : end + 1]
    body = b"".join(lines[1:-1])
    try:
        der = base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the base64 inside is malformed ({exc})") from None
    # validate=True still lets unused bits through ("AB==" decodes as "AA=="): only the
    # one canonical spelling of the key is taken.
    if base64.b64encode(der) != body:
        raise ValueError("the base64 inside is not canonical")
    return der


def _der_element(data: bytes, at: int) -> tuple[int, bytes, int]:
    """One DER tag-length-value at `at`: (tag, contents, where it ends)."""
    if at + 2 > len(data):
        raise ValueError("truncated")
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or at + count > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[at : at + count], "big")
        at += count
    if at + length > len(data):
        raise ValueError("truncated")
    return tag, data[at : at + length], at + length


def _spki_algorithm(der: bytes) -> bytes:
    """The algorithm OID of a SubjectPublicKeyInfo, only to name what a refused key is."""
    tag, spki, end = _der_element(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a SEQUENCE")
    tag, algorithm, after = _der_element(spki, 0)
    key_tag, _, key_end = _der_element(spki, after)
    if tag != 0x30 or key_tag != 0x03 or key_end != len(spki):
        raise ValueError("not an AlgorithmIdentifier and a BIT STRING")
    tag, oid, _ = _der_element(algorithm, 0)
    if tag != 0x06 or not oid:
        raise ValueError("no algorithm OID")
    return oid


def _dotted(oid: bytes) -> str:
    arcs: list[int] = []
    value = 0
    for byte in oid:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        return oid.hex()
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


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
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = {k.keyid: k.raw for k in trusted}
    if not signed.signatures:
        raise ManifestError("manifest is not signed")
    payload = canonical_bytes(signed.manifest)
    for signature in signed.signatures:
        raw = keys.get(signature.keyid)
        if raw is None:
            continue
        try:
            key = Ed25519PublicKey.from_public_bytes(raw)
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
    "ED25519_KEY_SIZE",
    "ED25519_SPKI_PREFIX",
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
