"""Desired states: what each device should run, stored first, published after commit."""

from __future__ import annotations

import json
import time
from typing import Literal

from sqlalchemy import event
from sqlalchemy.orm import Session

from fleet_server.services import audit
from fleet_server.state import FleetState
from fleet_server.tables import DesiredState as DesiredRow
from fleet_server.tables import Device, ModelVersion, utcnow
from protocol.messages import MESSAGE_SCHEMA_VERSION, DesiredState, ModelTarget, encode_payload


def artifact_url(state: FleetState, sha256: str) -> str:
    return f"{state.settings.resolved_public_url()}/api/v1/artifacts/{sha256}"


def assign(
    session: Session,
    state: FleetState,
    device: Device,
    model: ModelVersion | None,
    *,
    mode: Literal["active", "shadow"],
    actor: str,
    rollback: bool = False,
    deployment_id: str | None = None,
) -> DesiredState:
    """Store the device's next desired state; it goes out on MQTT once the commit holds,
    so the database is never behind what devices were told."""
    row = session.get(DesiredRow, device.id, with_for_update=True)
    now = time.time()
    desired = DesiredState(
        schema_version=MESSAGE_SCHEMA_VERSION,
        seq=(row.seq if row else 0) + 1,
        issued_at=now,
        expires_at=now + state.settings.desired_ttl_days * 86400,
        deployment_id=deployment_id,
        mode=mode,
        rollback=rollback,
        model=None
        if model is None
        else ModelTarget(
            name=model.name,
            version=model.version,
            sha256=model.sha256,
            size=model.size,
            artifact_url=artifact_url(state, model.sha256),
            manifest=json.loads(model.manifest_json),
        ),
    )
    payload = encode_payload(desired)
    if row is None:
        row = DesiredRow(device_id=device.id, seq=desired.seq, payload_json="")
        session.add(row)
    row.seq = desired.seq
    row.model_sha256 = model.sha256 if model else None
    row.payload_json = payload.decode("utf-8")
    row.updated_at = utcnow()
    target = f"{model.name}/{model.version}" if model else None
    audit.record(
        session, actor, "device.desired", device.id, model=target, mode=mode, seq=desired.seq
    )

    def publish(_: Session) -> None:
        state.publisher.publish_desired(device.id, payload)

    event.listen(session, "after_commit", publish, once=True)
    return desired
