"""Publisher keys and the model registry."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, File, HTTPException, Request, UploadFile, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from fleet_server.api.deps import Admin, Operator, SessionDep, StateDep, Viewer
from fleet_server.api.devices import _device_or_404
from fleet_server.blobs import TooLarge
from fleet_server.schemas import KeyCreate, KeyRead, ModelDetail, ModelRead
from fleet_server.services import desired, model_registry
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
    try:
        key = model_registry.add_key(session, body.name, body.public_key, caller.name)
    except model_registry.RejectedUpload as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except model_registry.Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
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
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"upload is {length} bytes; the limit is {limit}"
        )


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
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "model file is over the limit")
    manifest_bytes = manifest.file.read(MAX_MANIFEST_BYTES + 1)
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "manifest is over 1 MiB")
    upload = model_registry.Upload(manifest=manifest_bytes, model=model.file)
    try:
        row = model_registry.register_model(
            session, state.blobs, upload, caller.name, state.settings.max_upload_bytes
        )
    except TooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except model_registry.RejectedUpload as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except model_registry.Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return model_read(row)


@router.get("/models", response_model=list[ModelRead])
def list_models(session: SessionDep, _: Viewer, name: str | None = None) -> list[ModelRead]:
    query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.id)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    return [model_read(m) for m in session.scalars(query)]


def _model_or_404(session: SessionDep, name: str, version: str) -> ModelVersion:
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name} {version}")
    return row


@router.get("/models/{name}/{version}", response_model=ModelDetail)
def get_model(name: str, version: str, session: SessionDep, _: Viewer) -> ModelDetail:
    row = _model_or_404(session, name, version)
    return ModelDetail(**model_read(row).model_dump(), manifest=json.loads(row.manifest_json))


class DesiredRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=128)
    version: str | None = Field(default=None, max_length=64)
    mode: Literal["active", "shadow"] = "active"
    rollback: bool = False


class DesiredRead(BaseModel):
    device_id: str
    seq: int
    model: str | None
    mode: str


@router.put("/devices/{device_id}/desired", response_model=DesiredRead)
def set_desired(
    device_id: str, body: DesiredRequest, session: SessionDep, state: StateDep, caller: Operator
) -> DesiredRead:
    """Point one device at a model version (or at none); rollouts do this for many."""
    device = _device_or_404(session, device_id)
    if (body.name is None) != (body.version is None):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "give both name and version")
    model = _model_or_404(session, body.name, body.version) if body.name and body.version else None
    try:
        sent = desired.assign(
            session, state, device, model, mode=body.mode, rollback=body.rollback, actor=caller.name
        )
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    target = f"{model.name}/{model.version}" if model else None
    return DesiredRead(device_id=device.id, seq=sent.seq, model=target, mode=sent.mode)
