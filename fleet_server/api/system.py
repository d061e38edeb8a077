"""Liveness, metrics and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from fleet_server.api.deps import Admin, SessionDep, StateDep
from fleet_server.models import AuditEvent, Device, ModelVersion
from fleet_server.schemas import MAX_OFFSET, AuditRead, Health

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health)
def healthz(session: SessionDep, state: StateDep) -> Health:
    session.execute(text("SELECT 1"))
    if state.settings.mqtt_url is None:
        return Health(status="ok", database="ok", mqtt="disabled")
    if state.publisher.connected:
        return Health(status="ok", database="ok", mqtt="connected")
    return Health(status="ok", database="ok", mqtt="disconnected")


@router.get("/metrics", response_class=Response)
def metrics(session: SessionDep, state: StateDep) -> Response:
    # Not dict(result): a Result has keys(), so dict() would read it as a mapping.
    grouped = session.execute(select(Device.status, func.count()).group_by(Device.status))
    counts = {status: count for status, count in grouped}
    for status in ("online", "offline", "decommissioned"):
        state.metrics.devices.labels(status).set(counts.get(status, 0))
    state.metrics.models.set(session.scalar(select(func.count()).select_from(ModelVersion)) or 0)
    state.metrics.mqtt_connected.set(1 if state.publisher.connected else 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/audit", response_model=list[AuditRead])
def audit_log(
    session: SessionDep,
    _: Admin,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[AuditRead]:
    rows = session.scalars(
        select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    )
    return [
        AuditRead(
            id=r.id, ts=r.ts, actor=r.actor, action=r.action, target=r.target, details=r.details
        )
        for r in rows
    ]
