"""A real Mosquitto per test, configured by `write_broker_config`.

Start-up takes some 10-30 ms, so every test gets a broker of its own and no state leaks
between tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devfleet.local import start_broker
from devfleet.mosquitto import Mosquitto
from fleet_server.mqtt.broker_admin import BrokerAdmin
from fleet_server.mqtt.broker_config import BrokerCredentials


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
    process, credentials = start_broker(config_dir, mosquitto_executable)
    try:
        yield RunningBroker(process.host, process.port, credentials, config_dir, process)
    finally:
        # SIGKILL: nothing here needs saving, and a clean stop costs ~120 ms per test.
        process.kill()


@pytest.fixture
def broker_admin(broker: RunningBroker) -> Iterator[BrokerAdmin]:
    admin = BrokerAdmin(broker.host, broker.port, broker.credentials).open()
    try:
        yield admin
    finally:
        admin.close()
