"""Device enrolment, lookup, tagging and decommissioning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_server.auth import matches, new_device_id, new_secret, secret_hash
from fleet_server.errors import NotFound, Rejected
from fleet_server.services import audit
from fleet_server.services.tokens import consume_enrollment_token
from fleet_server.tables import Device, DeviceTag, utcnow
from protocol.enrollment import check_tags as protocol_check_tags


class BrokerAccess(Protocol):
    """What the device registry needs from the broker (`mqtt.broker_admin.BrokerAdmin`)."""

    def add_device(self, device_id: str, password: str, prefix: str = ...) -> None: ...

    def remove_device(self, device_id: str) -> None: ...


def check_tags(tags: list[str]) -> list[str]:
    """The wire contract's tag rule; Rejected naming the bad tags."""
    try:
        return protocol_check_tags(tags)
    except ValueError as exc:
        raise Rejected(str(exc)) from None


@dataclass(frozen=True)
class Enrolled:
    device: Device
    secret: str


def enroll(
    session: Session,
    *,
    token: str,
    name: str | None,
    tags: list[str],
    hardware: dict[str, Any],
) -> Enrolled:
    enrollment = consume_enrollment_token(session, token)
    device_id = new_device_id()
    secret = new_secret()
    device = Device(
        id=device_id,
        name=name or device_id,
        hardware=hardware,
        secret_hash=secret_hash(secret),
        status="offline",
    )
    device.tags = [DeviceTag(tag=t) for t in check_tags([*enrollment.tags, *tags])]
    session.add(device)
    audit.record(session, f"device:{device_id}", "device.enroll", device_id, name=device.name)
    return Enrolled(device, secret)


def list_devices(
    session: Session,
    *,
    tag: str | None,
    status: str | None,
    model_version: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Device], int]:
    query = select(Device).where(Device.decommissioned_at.is_(None))
    if tag is not None:
        query = query.where(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    if status is not None:
        query = query.where(Device.status == status)
    if model_version is not None:
        query = query.where(Device.model_version == model_version)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Device.enrolled_at, Device.id).limit(limit).offset(offset)
    )
    return list(rows), total


def get_device(session: Session, device_id: str) -> Device | None:
    device = session.get(Device, device_id)
    if device is None or device.decommissioned_at is not None:
        return None
    return device


def require_device(session: Session, device_id: str) -> Device:
    """The enrolled device with this id; NotFound for an unknown or decommissioned one."""
    device = get_device(session, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    return device


def set_tags(session: Session, device: Device, tags: list[str], actor: str) -> Device:
    clean = check_tags(tags)
    device.tags = [DeviceTag(tag=t) for t in clean]
    audit.record(session, actor, "device.tags", device.id, tags=clean)
    return device


def decommission(session: Session, device: Device, actor: str) -> None:
    """Revoke the credential: the secret stops working for HTTP at commit, and the caller
    removes the device from the broker, which kicks its live connection."""
    device.decommissioned_at = utcnow()
    device.status = "decommissioned"
    device.secret_hash = "revoked"
    audit.record(session, actor, "device.decommission", device.id)


def authenticate_device(session: Session, device_id: str, secret: str) -> Device | None:
    device = get_device(session, device_id)
    if device is None or not matches(secret, device.secret_hash):
        return None
    return device
