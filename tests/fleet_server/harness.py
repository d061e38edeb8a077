"""Pieces the server tests and the ingest benchmark both stand on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from fleet_server.app import create_app
from fleet_server.mqtt.bridge import MqttBridge
from fleet_server.settings import Settings
from fleet_server.state import FleetState


def create_database(server_url: str, prefix: str, connect_timeout: int = 10) -> str:
    """A new, empty database on the PostgreSQL server behind server_url; its URL."""
    server = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": connect_timeout}
    )
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return server.set(database=name).render_as_string(hide_password=False)


def drop_database(database_url: str) -> None:
    target: URL = make_url(database_url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)'))
    finally:
        admin.dispose()


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
