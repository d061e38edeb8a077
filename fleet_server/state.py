"""What the HTTP routes and the MQTT bridge share: one object, built by create_app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.blobs import BlobStore
from fleet_server.server_metrics import ServerMetrics
from fleet_server.services.devices import BrokerAccess
from fleet_server.settings import Settings
from protocol.topics import Topics

if TYPE_CHECKING:
    # Only for the annotation: the gates' module reaches this one through the controller.
    from fleet_server.rollouts.watch import LiveGates


class DesiredPublisher:
    """Where desired states go once stored: the MQTT bridge, or nowhere without a broker."""

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        return None

    def forget_device(self, device_id: str) -> None:
        return None

    @property
    def connected(self) -> bool:
        return False


@dataclass
class FleetState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    topics: Topics
    metrics: ServerMetrics
    live_gates: LiveGates
    broker: BrokerAccess | None = None
    publisher: DesiredPublisher = field(default_factory=DesiredPublisher)
