"""Enrolment and the device registry."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.schemas import (
    MAX_OFFSET,
    DevicePage,
    DevicePatch,
    DeviceRead,
    EnrollRequest,
    EnrollResponse,
    MqttAccess,
)
from fleet_server.services import devices
from fleet_server.services.tokens import EnrollmentRefused
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


@router.post("/enroll", status_code=status.HTTP_201_CREATED, response_model=EnrollResponse)
def enroll(body: EnrollRequest, session: SessionDep, state: StateDep) -> EnrollResponse:
    try:
        enrolled = devices.enroll(
            session, token=body.token, name=body.name, tags=body.tags, hardware=body.hardware
        )
    except EnrollmentRefused as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    session.flush()
    if state.broker is not None:
        try:
            state.broker.add_device(enrolled.device.id, enrolled.secret, state.topics.prefix)
        except Exception as exc:
            # The transaction rolls back: no device exists that the broker does not know.
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"broker refused the device: {exc}"
            ) from None
    address = state.settings.mqtt_address()
    return EnrollResponse(
        device_id=enrolled.device.id,
        secret=enrolled.secret,
        mqtt=MqttAccess(
            host=address[0] if address else None,
            port=address[1] if address else None,
            username=enrolled.device.id,
            topic_prefix=state.topics.prefix,
        ),
        api_url=state.settings.resolved_public_url(),
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


def _device_or_404(session: SessionDep, device_id: str) -> Device:
    device = devices.get_device(session, device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return device


@router.get("/devices/{device_id}", response_model=DeviceRead)
def get_device(device_id: str, session: SessionDep, _: Viewer) -> DeviceRead:
    return device_read(_device_or_404(session, device_id))


@router.patch("/devices/{device_id}", response_model=DeviceRead)
def patch_device(
    device_id: str, body: DevicePatch, session: SessionDep, caller: Operator
) -> DeviceRead:
    device = _device_or_404(session, device_id)
    try:
        devices.set_tags(session, device, body.tags, caller.name)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return device_read(device)


@router.delete("/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT)
def decommission(
    device_id: str, session: SessionDep, state: StateDep, caller: Operator
) -> Response:
    device = _device_or_404(session, device_id)
    devices.decommission(session, device, caller.name)
    if state.broker is not None:
        try:
            state.broker.remove_device(device.id)
        except Exception as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"broker could not revoke the device: {exc}"
            ) from None
    state.publisher.forget_device(device.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
