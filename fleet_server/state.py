"""What the HTTP routes, the MQTT bridge and the background loops share: one object,
complete when `build_state` (fleet_server.app) returns it. Its MQTT side is built there
too, and connected by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.blobs import BlobStore
from fleet_server.metrics.server import ServerMetrics
from fleet_server.mqtt.runtime import MqttRuntime
from fleet_server.rollouts.watch import LiveGates
from fleet_server.services.desired import DesiredPublisher, DesiredStates
from fleet_server.services.devices import BrokerAccess
from fleet_server.settings import Settings
from protocol.topics import Topics


@dataclass(frozen=True)
class FleetState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    topics: Topics
    metrics: ServerMetrics
    live_gates: LiveGates
    desired: DesiredStates
    broker: BrokerAccess | None  # None: devices get no broker login (no broker configured)
    mqtt: MqttRuntime | None  # the bridge and the broker admin, started by the lifespan

    @property
    def publisher(self) -> DesiredPublisher:
        return self.desired.publisher
