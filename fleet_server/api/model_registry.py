"""Publisher keys and the model registry."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile, status
from sqlalchemy import select

from fleet_server.api.deps import Admin, Operator, SessionDep, StateDep, Viewer
from fleet_server.errors import TooLarge
from fleet_server.schemas import KeyCreate, KeyRead, ModelDetail, ModelRead
from fleet_server.services import model_registry
from fleet_server.tables import ModelVersion, PublisherKey
from protocol.manifest import MANIFEST_FILE

router = APIRouter(prefix="/api/v1", tags=["models"])
# A manifest is a few kilobytes; one far larger is not ours.
MAX_MANIFEST_BYTES = 1 << 20


def key_read(key: PublisherKey) -> KeyRead:
    return KeyRead(
        name=key.name, keyid=key.keyid, public_key=key.public_key_pem, created_at=key.created_at
    )


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=KeyRead)
def add_key(body: KeyCreate, session: SessionDep, caller: Admin) -> KeyRead:
    key = model_registry.add_key(session, body.name, body.public_key, caller.name)
    session.flush()
    return key_read(key)


@router.get("/keys", response_model=list[KeyRead])
def list_keys(session: SessionDep, _: Viewer) -> list[KeyRead]:
    return [key_read(k) for k in session.scalars(select(PublisherKey).order_by(PublisherKey.id))]


def model_read(row: ModelVersion) -> ModelRead:
    return ModelRead(
        name=row.name,
        version=row.version,
        sha256=row.sha256,
        size=row.size,
        quantization=row.quantization,
        signed_by=row.signed_by,
        created_at=row.created_at,
        uploaded_by=row.uploaded_by,
    )


def _check_size(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"upload is {length} bytes; the limit is {limit}")


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelRead)
def upload_model(
    request: Request,
    session: SessionDep,
    state: StateDep,
    manifest: Annotated[UploadFile, File(description=f"the bundle's {MANIFEST_FILE}")],
    model: Annotated[UploadFile, File(description="the bundle's model.tflite")],
    caller: Operator,
) -> ModelRead:
    _check_size(request, state.settings.max_upload_bytes)
    if (model.size or 0) > state.settings.max_upload_bytes:
        raise TooLarge("model file is over the limit")
    manifest_bytes = manifest.file.read(MAX_MANIFEST_BYTES + 1)
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise TooLarge("manifest is over 1 MiB")
    upload = model_registry.Upload(manifest=manifest_bytes, model=model.file)
    row = model_registry.register_model(
        session, state.blobs, upload, caller.name, state.settings.max_upload_bytes
    )
    return model_read(row)


@router.get("/models", response_model=list[ModelRead])
def list_models(session: SessionDep, _: Viewer, name: str | None = None) -> list[ModelRead]:
    query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.id)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    return [model_read(m) for m in session.scalars(query)]


@router.get("/models/{name}/{version}", response_model=ModelDetail)
def get_model(name: str, version: str, session: SessionDep, _: Viewer) -> ModelDetail:
    row = model_registry.get_model(session, name, version)
    return ModelDetail(**model_read(row).model_dump(), manifest=json.loads(row.manifest_json))
