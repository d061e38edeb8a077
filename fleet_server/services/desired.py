"""Desired states: what each device should run, stored first, published after commit."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from sqlalchemy import event
from sqlalchemy.orm import Session

from fleet_server.errors import Rejected
from fleet_server.services import audit
from fleet_server.tables import DesiredState as DesiredRow
from fleet_server.tables import Device, ModelVersion, utcnow
from protocol.messages import MESSAGE_SCHEMA_VERSION, DesiredState, ModelTarget, encode_payload


class DesiredPublisher(Protocol):
    """Where desired states go once stored: the MQTT bridge (`mqtt.bridge.MqttBridge`)."""

    def publish_desired(self, device_id: str, payload: bytes) -> None: ...

    def forget_device(self, device_id: str) -> None: ...

    @property
    def connected(self) -> bool: ...


class NoPublisher:
    """A server without a broker: desired states are stored and go nowhere."""

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        return None

    def forget_device(self, device_id: str) -> None:
        return None

    @property
    def connected(self) -> bool:
        return False


@dataclass(frozen=True)
class DesiredStates:
    """Assigns models to devices: what a desired state needs, and nothing else."""

    publisher: DesiredPublisher
    public_url: str  # where devices reach the server's API, for artifact URLs
    ttl_s: float  # how long a desired state stays valid on the device (freeze protection)

    def artifact_url(self, sha256: str) -> str:
        return f"{self.public_url}/api/v1/artifacts/{sha256}"

    def assign(
        self,
        session: Session,
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
        try:
            desired = DesiredState(
                schema_version=MESSAGE_SCHEMA_VERSION,
                seq=(row.seq if row else 0) + 1,
                issued_at=now,
                expires_at=now + self.ttl_s,
                deployment_id=deployment_id,
                mode=mode,
                rollback=rollback,
                model=None if model is None else self._target(model),
            )
        except ValueError as exc:  # the wire contract refuses it: a rollback to nothing, say
            raise Rejected(str(exc)) from None
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
            self.publisher.publish_desired(device.id, payload)

        event.listen(session, "after_commit", publish, once=True)
        return desired

    def _target(self, model: ModelVersion) -> ModelTarget:
        return ModelTarget(
            name=model.name,
            version=model.version,
            sha256=model.sha256,
            size=model.size,
            artifact_url=self.artifact_url(model.sha256),
            manifest=json.loads(model.manifest_json),
        )
