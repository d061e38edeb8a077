"""The whole server in this process, its lifespan run and its MQTT bridge connected to a
real broker: what the server tests and the ingest benchmark stand on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

from fleet_server.app import create_app
from fleet_server.mqtt.bridge import MqttBridge
from fleet_server.settings import Settings
from fleet_server.state import FleetState


@contextmanager
def connected_server(
    data_dir: Path,
    database_url: str | None,
    broker_host: str,
    broker_port: int,
    broker_dir: Path,
    timeout: float = 10.0,
) -> Iterator[tuple[TestClient, FleetState, MqttBridge]]:
    """The whole server, its lifespan run, its MQTT bridge connected to the broker."""
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        mqtt_url=f"mqtt://{broker_host}:{broker_port}",
        broker_dir=broker_dir,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        state: FleetState = app.state.fleet
        bridge = state.publisher
        if not isinstance(bridge, MqttBridge) or not bridge.wait_connected(timeout):
            raise RuntimeError("the server's MQTT bridge did not connect")
        yield client, state, bridge
