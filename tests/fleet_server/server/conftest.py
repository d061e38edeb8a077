"""A real server on a real database: SQLite always, PostgreSQL too when
EDGEFLEET_TEST_POSTGRES_URL names a server (a fresh database per test)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devfleet.databases import create_database, drop_database
from fleet_server.app import create_app
from fleet_server.auth import Role
from fleet_server.db import transaction
from fleet_server.services.tokens import create_api_token, create_enrollment_token
from fleet_server.settings import Settings
from fleet_server.state import FleetState
from fleet_server.tables import Device
from protocol.signing import generate_keypair
from tests.bundles import Bundle, convert

POSTGRES_ENV = "EDGEFLEET_TEST_POSTGRES_URL"


def _backends() -> list[str]:
    return ["sqlite", "postgresql"] if os.environ.get(POSTGRES_ENV) else ["sqlite"]


@pytest.fixture(params=_backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    url = create_database(os.environ[POSTGRES_ENV], "edgefleet_test")
    try:
        yield url
    finally:
        drop_database(url)


@dataclass
class Server:
    client: TestClient
    state: FleetState
    settings: Settings

    def token(self, role: Role, name: str | None = None) -> dict[str, str]:
        with transaction(self.state.sessions) as session:
            secret = create_api_token(session, role, name or role.name, actor="test")
        return {"Authorization": f"Bearer {secret}"}

    def enrollment(self, *, tags: list[str] | None = None, uses: int = 1) -> str:
        with transaction(self.state.sessions) as session:
            return create_enrollment_token(
                session, tags=tags or [], uses=uses, expires_in=None, actor="test"
            )

    def enroll(self, **body: object) -> dict[str, str]:
        token = body.pop("token", None) or self.enrollment()
        response = self.client.post("/api/v1/enroll", json={"token": token, **body})
        assert response.status_code == 201, response.text
        data: dict[str, str] = response.json()
        return data


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    # The rollout controller is driven by hand here (`controller.step`), not by its thread.
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        max_upload_bytes=2 * 2**20,
        rollout_interval_s=0,
        # Gates judged afresh on every read: the tests change the evidence between reads.
        live_gates_max_age_s=0,
    )
    app = create_app(settings, start_bridge=False)
    with TestClient(app) as client:
        yield Server(client, app.state.fleet, settings)


@pytest.fixture(scope="session")
def bundle(reference_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A real bundle, converted and signed by edge-convert."""
    root = tmp_path_factory.mktemp("bundle")
    private, public = generate_keypair(root / "keys")
    tabular = reference_models["tabular"]
    return convert(tabular, root / "tabular", "tabular", "1.0.0", private, public)


@pytest.fixture(scope="session")
def bundle_v2(
    bundle: Bundle, reference_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Bundle:
    root = tmp_path_factory.mktemp("bundle-v2")
    return convert(
        reference_models["tabular"],
        root / "tabular",
        "tabular",
        "2.0.0",
        bundle.private_key,
        bundle.public_key,
    )


@pytest.fixture
def lab(server: Server, bundle: Bundle, bundle_v2: Bundle) -> dict[str, Any]:
    """tabular 1.0.0 and 2.0.0 registered, and ten devices tagged lab running 1.0.0: what a
    rollout of 2.0.0 starts from. `admin` holds an admin's headers."""
    admin = server.token(Role.admin)
    key = {"name": "publisher", "public_key": bundle.public_key.read_text()}
    assert server.client.post("/api/v1/keys", json=key, headers=admin).status_code == 201
    for b in (bundle, bundle_v2):
        response = server.client.post("/api/v1/models", files=b.files(), headers=admin)
        assert response.status_code == 201, response.text
    devices = [server.enroll(token=server.enrollment(tags=["lab"]))["device_id"] for _ in range(10)]
    with transaction(server.state.sessions) as session:
        for device_id in devices:
            device = session.get(Device, device_id)
            assert device is not None
            device.model_name, device.model_version = "tabular", "1.0.0"
    return {"admin": admin, "devices": devices}
