"""Publisher keys and the model registry: only signed, intact bundles get in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet_server.blobs import BlobStore
from fleet_server.errors import Conflict, NotFound, Rejected, TooLarge
from fleet_server.services import audit
from fleet_server.tables import ModelVersion, PublisherKey
from protocol.manifest import ManifestError, parse_manifest
from protocol.signing import SigningKeyError, TrustedKey, parse_public_key, verify_signature


def get_model(session: Session, name: str, version: str) -> ModelVersion:
    """The registered model `name` `version`; NotFound if there is none."""
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )
    if row is None:
        raise NotFound(f"no model {name} {version}")
    return row


def add_key(session: Session, name: str, public_key: str, actor: str) -> PublisherKey:
    try:
        trusted = parse_public_key(public_key, "public_key")
    except SigningKeyError as exc:
        raise Rejected(str(exc)) from None
    exists = session.scalar(
        select(PublisherKey).where(
            (PublisherKey.name == name) | (PublisherKey.keyid == trusted.keyid)
        )
    )
    if exists is not None:
        raise Conflict(
            f"a key named {exists.name!r} with id {exists.keyid[:16]} is already trusted"
        )
    key = PublisherKey(name=name, keyid=trusted.keyid, public_key_pem=public_key.strip() + "\n")
    session.add(key)
    audit.record(session, actor, "key.add", name, keyid=trusted.keyid)
    return key


def trusted_keys(session: Session) -> list[TrustedKey]:
    return [parse_public_key(k.public_key_pem) for k in session.scalars(select(PublisherKey))]


@dataclass(frozen=True)
class Upload:
    manifest: bytes
    model: BinaryIO


def register_model(
    session: Session, blobs: BlobStore, upload: Upload, actor: str, max_bytes: int | None = None
) -> ModelVersion:
    """Check everything before anything is stored; the blob is content-addressed, so a
    rejected upload leaves nothing that a later one could be confused with."""
    try:
        signed = parse_manifest(upload.manifest)
        signature = verify_signature(signed, trusted_keys(session))
    except ManifestError as exc:
        raise Rejected(str(exc)) from None
    m = signed.manifest
    taken = session.scalar(
        select(ModelVersion).where(ModelVersion.name == m.name, ModelVersion.version == m.version)
    )
    if taken is not None:
        raise Conflict(f"model {m.name} {m.version} is already registered")
    if max_bytes is not None and m.model.size > max_bytes:
        raise TooLarge(f"the manifest declares {m.model.size} bytes; the limit is {max_bytes}")
    try:
        size = blobs.put(upload.model, m.model.sha256, max_bytes)
    except TooLarge:
        raise
    except ValueError:
        raise Rejected(
            "the model file's sha256 does not match the manifest: "
            "it is not the model that was signed"
        ) from None
    if size != m.model.size:
        raise Rejected(f"the model file is {size} bytes but the manifest says {m.model.size}")
    row = ModelVersion(
        name=m.name,
        version=m.version,
        sha256=m.model.sha256,
        size=size,
        quantization=m.quantization.mode.value,
        signed_by=signature.keyid,
        manifest_json=upload.manifest.decode("utf-8"),
        uploaded_by=actor,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"model {m.name} {m.version} is already registered") from None
    audit.record(session, actor, "model.register", f"{m.name}/{m.version}", sha256=m.model.sha256)
    return row
