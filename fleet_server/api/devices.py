"""The device registry, and pointing one device at a model."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response, status

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.errors import Rejected, Unavailable
from fleet_server.schemas import (
    MAX_OFFSET,
    DesiredRead,
    DesiredRequest,
    DevicePage,
    DevicePatch,
    DeviceRead,
)
from fleet_server.services import devices, model_registry
from fleet_server.tables import Device

router = APIRouter(prefix="/api/v1", tags=["devices"])


def device_read(device: Device) -> DeviceRead:
    return DeviceRead(
        id=device.id,
        name=device.name,
        tags=[t.tag for t in device.tags],
        hardware=device.hardware,
        status=device.status,
        last_seen_at=device.last_seen_at,
        agent_version=device.agent_version,
        model_name=device.model_name,
        model_version=device.model_version,
        enrolled_at=device.enrolled_at,
    )


@router.get("/devices", response_model=DevicePage)
def list_devices(
    session: SessionDep,
    _: Viewer,
    tag: str | None = None,
    status_: Annotated[Literal["online", "offline"] | None, Query(alias="status")] = None,
    model_version: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> DevicePage:
    rows, total = devices.list_devices(
        session, tag=tag, status=status_, model_version=model_version, limit=limit, offset=offset
    )
    return DevicePage(items=[device_read(d) for d in rows], total=total, limit=limit, offset=offset)


@router.get("/devices/{device_id}", response_model=DeviceRead)
def get_device(device_id: str, session: SessionDep, _: Viewer) -> DeviceRead:
    return device_read(devices.require_device(session, device_id))


@router.patch("/devices/{device_id}", response_model=DeviceRead)
def patch_device(
    device_id: str, body: DevicePatch, session: SessionDep, caller: Operator
) -> DeviceRead:
    device = devices.require_device(session, device_id)
    devices.set_tags(session, device, body.tags, caller.name)
    return device_read(device)


@router.delete("/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT)
def decommission(
    device_id: str, session: SessionDep, state: StateDep, caller: Operator
) -> Response:
    device = devices.require_device(session, device_id)
    devices.decommission(session, device, caller.name)
    if state.broker is not None:
        try:
            state.broker.remove_device(device.id)
        except Exception as exc:
            raise Unavailable(f"broker could not revoke the device: {exc}") from None
    state.publisher.forget_device(device.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put("/devices/{device_id}/desired", response_model=DesiredRead)
def set_desired(
    device_id: str, body: DesiredRequest, session: SessionDep, state: StateDep, caller: Operator
) -> DesiredRead:
    """Point one device at a model version (or at none); rollouts do this for many."""
    device = devices.require_device(session, device_id)
    if (body.name is None) != (body.version is None):
        raise Rejected("give both name and version")
    model = None
    if body.name and body.version:  # both empty, as both null, say "run no model"
        model = model_registry.get_model(session, body.name, body.version)
    sent = state.desired.assign(
        session, device, model, mode=body.mode, rollback=body.rollback, actor=caller.name
    )
    target = f"{model.name}/{model.version}" if model else None
    return DesiredRead(device_id=device.id, seq=sent.seq, model=target, mode=sent.mode)
