"""Property-based requests over the whole OpenAPI schema, with an admin token: no 5xx.

schemathesis generates bodies, paths and queries from the schema (valid and not), on a
server that already has devices, a trusted key and a model, so the deep paths are reached.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from fleet_server.app import create_app
from fleet_server.auth import Role
from fleet_server.db import transaction
from fleet_server.services.tokens import create_api_token
from fleet_server.settings import Settings
from tests.bundles import Bundle
from tests.fleet_server.server.conftest import Server

ADMIN: dict[str, str] = {}
EXAMPLES = 40


@pytest.fixture(scope="module")
def api_app(tmp_path_factory: pytest.TempPathFactory, bundle: Bundle) -> Iterator[FastAPI]:
    root = tmp_path_factory.mktemp("schemathesis")
    app = create_app(Settings(data_dir=root / "data", max_upload_bytes=2**20), start_bridge=False)
    with TestClient(app) as client:
        server = Server(client, app.state.fleet, app.state.fleet.settings)
        with transaction(server.state.sessions) as session:
            token = create_api_token(session, Role.admin, "schemathesis", actor="test")
        ADMIN["Authorization"] = f"Bearer {token}"
        key = {"name": "release", "public_key": bundle.public_key.read_text()}
        assert client.post("/api/v1/keys", json=key, headers=ADMIN).status_code == 201
        assert client.post("/api/v1/models", files=bundle.files(), headers=ADMIN).status_code == 201
        for _ in range(3):
            server.enroll()
        yield app


@pytest.fixture(scope="module")
def api_schema(api_app: FastAPI) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", api_app)


@pytest.mark.slow
def test_no_request_makes_the_server_fail(api_schema: schemathesis.BaseSchema) -> None:
    # Driven through Hypothesis directly: schemathesis' pytest plugin does not work with
    # pytest 9 yet. Every operation is run; all failures are reported together.
    failures: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            # The same examples on every run: CI must not go red on a new random draw.
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=ADMIN, checks=[not_a_server_error])

        try:
            run()
        except Exception as exc:  # one line per failing operation
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:2000])
    assert not failures, "\n\n".join(failures)


def test_the_schema_covers_every_route(api_schema: schemathesis.BaseSchema) -> None:
    paths = set(api_schema.raw_schema["paths"])
    for path in ("/api/v1/enroll", "/api/v1/devices/{device_id}", "/api/v1/models", "/healthz"):
        assert path in paths
