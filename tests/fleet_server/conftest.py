"""A real Mosquitto per test, configured by `write_broker_config`.

Start-up takes some 10-30 ms, so every test gets a broker of its own and no state leaks
between tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet_server.broker import BrokerAdmin, BrokerCredentials, write_broker_config
from fleet_server.mosquitto import Mosquitto, MosquittoError, free_port

# free_port() cannot reserve the port; on a busy machine someone may take it first.
_PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class RunningBroker:
    host: str
    port: int
    credentials: BrokerCredentials
    config_dir: Path
    process: Mosquitto


@pytest.fixture
def broker(tmp_path: Path, mosquitto_executable: str) -> Iterator[RunningBroker]:
    config_dir = tmp_path / "broker"
    process, credentials = _start_on_free_port(config_dir, mosquitto_executable)
    try:
        yield RunningBroker(process.host, process.port, credentials, config_dir, process)
    finally:
        # SIGKILL: nothing here needs saving, and a clean stop costs ~120 ms per test.
        process.kill()


@pytest.fixture
def broker_admin(broker: RunningBroker) -> Iterator[BrokerAdmin]:
    admin = BrokerAdmin.connect(broker.host, broker.port, broker.credentials)
    try:
        yield admin
    finally:
        admin.close()


def _start_on_free_port(config_dir: Path, executable: str) -> tuple[Mosquitto, BrokerCredentials]:
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        credentials = write_broker_config(config_dir, port=free_port(), force=True)
        process = Mosquitto(config_dir, executable)
        try:
            process.start()
        except MosquittoError as error:
            if "Address already in use" not in str(error) or attempt == _PORT_ATTEMPTS:
                raise
        else:
            return process, credentials
    raise AssertionError("unreachable")
