"""Liveness, metrics and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import select, text

from fleet_server.api.deps import Admin, SessionDep, StateDep
from fleet_server.metrics import fleet as fleet_metrics
from fleet_server.schemas import MAX_OFFSET, AuditRead, Health
from fleet_server.tables import AuditEvent

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
    # Unauthenticated, as Prometheus scrapes it: it carries counts, model versions, rollout
    # ids and gate figures, never a device id, token or free-text reason.
    return Response(fleet_metrics.render(session, state), media_type=CONTENT_TYPE_LATEST)


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
