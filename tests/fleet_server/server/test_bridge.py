"""The server with its MQTT bridge, a real Mosquitto configured by broker-config, and devices
that enrolled through the API and connect with the credentials it gave them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from devfleet.in_process import connected_server
from fleet_server.auth import Role
from fleet_server.db import transaction
from fleet_server.mqtt.bridge import MqttBridge
from fleet_server.tables import Device, HealthRow, InferenceRow, UpdateReportRow
from protocol.manifest import parse_manifest
from protocol.messages import (
    Availability,
    DesiredState,
    HealthSample,
    InferenceStats,
    TelemetryBatch,
    UpdateReport,
    UpdateState,
    decode_payload,
    encode_payload,
)
from protocol.signing import load_public_key, verify_signature
from protocol.topics import Topics
from tests.bundles import Bundle
from tests.fleet_server.conftest import RunningBroker
from tests.fleet_server.device_client import WAIT, DeviceClient
from tests.fleet_server.server.conftest import Server

TOPICS = Topics()


@dataclass
class Fleet(Server):
    broker: RunningBroker
    bridge: MqttBridge

    def device(self, **enroll: object) -> DeviceClient:
        enrolled = self.enroll(**enroll)
        client = DeviceClient(
            self.broker.host, self.broker.port, enrolled["device_id"], enrolled["secret"]
        )
        assert client.connect(), client.connect_reason
        return client

    def db_count(self, model: type, **where: object) -> int:
        with transaction(self.state.sessions) as session:
            query = select(func.count()).select_from(model)
            for name, value in where.items():
                query = query.where(getattr(model, name) == value)
            return session.scalar(query) or 0


@pytest.fixture
def fleet(broker: RunningBroker, database_url: str, tmp_path: Path) -> Iterator[Fleet]:
    with connected_server(
        tmp_path / "data", database_url, broker.host, broker.port, broker.config_dir, WAIT
    ) as (client, state, bridge):
        yield Fleet(client, state, state.settings, broker, bridge)


def eventually(check: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def telemetry(seq: int, now: float) -> bytes:
    return encode_payload(
        TelemetryBatch(
            schema_version=1,
            seq=seq,
            sent_at=now,
            dropped=0,
            health=(HealthSample(now, 12.5, 40.0, 30_000_000, 51.0, 10**9, 3600.0, "0.1.0"),),
            inference=(
                InferenceStats(
                    now, "tabular", "1.0.0", 60.0, 100, 1, 0.1, 0.2, 0.3, 0.9, (40, 60), 0, None
                ),
            ),
            accuracy=(),
            shadow=(),
        )
    )


def report(msg_id: int, now: float) -> bytes:
    return encode_payload(
        UpdateReport(
            schema_version=1,
            msg_id=msg_id,
            ts=now,
            deployment_id=None,
            desired_seq=1,
            state=UpdateState.ACTIVE,
            model_name="tabular",
            model_version="1.0.0",
            reason=None,
            detail=None,
        )
    )


def test_device_messages_are_stored(fleet: Fleet) -> None:
    device = fleet.device()
    now = time.time()
    online = encode_payload(Availability(1, "online", now, "0.1.0"))
    device.publish(TOPICS.availability(device.device_id), online, retain=True)
    device.publish(TOPICS.reports(device.device_id), report(1, now))
    device.publish(TOPICS.telemetry(device.device_id), telemetry(1, now))
    assert eventually(lambda: fleet.db_count(InferenceRow) == 1)
    assert fleet.bridge.drain()
    assert fleet.db_count(HealthRow, device_id=device.device_id) == 1
    assert fleet.db_count(UpdateReportRow, device_id=device.device_id, state="active") == 1
    with transaction(fleet.state.sessions) as session:
        row = session.get(Device, device.device_id)
        assert row is not None
        assert (row.status, row.agent_version, row.model_version) == ("online", "0.1.0", "1.0.0")
    device.close()


def test_redelivered_messages_are_stored_once(fleet: Fleet) -> None:
    device = fleet.device()
    now = time.time()
    for _ in range(3):
        device.publish(TOPICS.telemetry(device.device_id), telemetry(7, now))
        device.publish(TOPICS.reports(device.device_id), report(7, now))
    device.publish(TOPICS.telemetry(device.device_id), telemetry(8, now))
    assert eventually(lambda: fleet.db_count(HealthRow) == 2)
    assert fleet.bridge.drain()
    assert fleet.db_count(UpdateReportRow) == 1
    metrics = fleet.client.get("/metrics").text
    assert 'edgefleet_mqtt_duplicates_total{kind="all"} 4.0' in metrics
    device.close()


def test_malformed_payloads_are_counted_and_the_bridge_carries_on(fleet: Fleet) -> None:
    device = fleet.device()
    topic = TOPICS.telemetry(device.device_id)
    device.publish(topic, b"{not json")
    device.publish(topic, b'{"schema_version": 1, "seq": "one"}')
    device.publish(topic, b'{"schema_version": 99}')
    device.publish(topic, b"x" * (300 * 1024))
    device.publish(topic, telemetry(1, time.time()))
    assert eventually(lambda: fleet.db_count(HealthRow) == 1)
    metrics = fleet.client.get("/metrics").text
    assert 'edgefleet_mqtt_invalid_payloads_total{kind="telemetry",reason="schema"} 3.0' in metrics
    assert (
        'edgefleet_mqtt_invalid_payloads_total{kind="telemetry",reason="oversized"} 1.0' in metrics
    )
    assert fleet.client.get("/healthz").json()["mqtt"] == "connected"
    device.close()


def _upload(fleet: Fleet, bundle: Bundle) -> dict[str, str]:
    admin = fleet.token(Role.admin)
    key = {"name": "release", "public_key": bundle.public_key.read_text()}
    assert fleet.client.post("/api/v1/keys", json=key, headers=admin).status_code == 201
    response = fleet.client.post("/api/v1/models", files=bundle.files(), headers=admin)
    assert response.status_code == 201, response.text
    return admin


def test_desired_state_is_retained_for_a_device_that_connects_later(
    fleet: Fleet, bundle: Bundle
) -> None:
    operator = _upload(fleet, bundle)
    enrolled = fleet.enroll()
    device_id = enrolled["device_id"]
    body = {"name": "tabular", "version": "1.0.0"}
    response = fleet.client.put(f"/api/v1/devices/{device_id}/desired", json=body, headers=operator)
    assert response.status_code == 200
    # The device was offline when the server published; it converges when it connects.
    device = DeviceClient(fleet.broker.host, fleet.broker.port, device_id, enrolled["secret"])
    assert device.connect()
    assert device.subscribe(TOPICS.desired(device_id))[0].value < 0x80
    assert device.got_message.wait(WAIT)
    desired = decode_payload(DesiredState, bytes(device.received[0].payload))
    assert desired.seq == 1
    assert desired.model is not None
    assert (desired.model.name, desired.model.version) == ("tabular", "1.0.0")
    signed = desired.model.signed_manifest()
    verify_signature(signed, [load_public_key(bundle.public_key)])
    assert signed == parse_manifest((bundle.folder / "manifest.json").read_bytes())
    # And it may download exactly that artifact with its credential.
    url = desired.model.artifact_url.removeprefix(fleet.settings.resolved_public_url())
    download = fleet.client.get(url, auth=(device_id, enrolled["secret"]))
    assert download.status_code == 200
    assert download.content == (bundle.folder / "model.tflite").read_bytes()
    device.close()


def test_another_devices_topics_and_a_revoked_credential_are_refused(
    fleet: Fleet, bundle: Bundle
) -> None:
    operator = _upload(fleet, bundle)
    mine, theirs = fleet.device(), fleet.device()
    online = encode_payload(Availability(1, "online", time.time(), "0.1.0"))
    mine.publish(TOPICS.availability(mine.device_id), online, retain=True)
    # The broker refuses a subscription to another device's topics.
    for kind in ("desired", "telemetry"):
        codes = mine.subscribe(f"edgefleet/devices/{theirs.device_id}/{kind}")
        assert codes[0].value >= 0x80, codes
    assert mine.subscribe("edgefleet/#")[0].value >= 0x80

    body = {"name": "tabular", "version": "1.0.0"}
    fleet.client.put(f"/api/v1/devices/{mine.device_id}/desired", json=body, headers=operator)
    manifest = parse_manifest((bundle.folder / "manifest.json").read_bytes()).manifest
    url = f"/api/v1/artifacts/{manifest.model.sha256}"
    assert fleet.client.get(url, auth=(mine.device_id, mine.secret)).status_code == 200

    # Decommissioning kicks the live connection, refuses a reconnect and the download.
    response = fleet.client.delete(f"/api/v1/devices/{mine.device_id}", headers=operator)
    assert response.status_code == 204
    assert mine.disconnected.wait(WAIT)
    mine.close()
    again = DeviceClient(fleet.broker.host, fleet.broker.port, mine.device_id, mine.secret)
    assert not again.connect()
    assert fleet.client.get(url, auth=(mine.device_id, mine.secret)).status_code == 401
    # A kick sends no last will: the server clears the retained "online" itself.
    credentials = fleet.broker.credentials
    watcher = DeviceClient(fleet.broker.host, fleet.broker.port, "watcher", credentials.password)
    watcher.client.username_pw_set(credentials.username, credentials.password)
    assert watcher.connect()
    assert watcher.subscribe(TOPICS.availability(mine.device_id))[0].value < 0x80
    assert not watcher.got_message.wait(1.0), watcher.received[0].payload
    watcher.close()
    theirs.close()


def test_a_killed_ingest_process_is_replaced_and_nothing_is_lost(fleet: Fleet) -> None:
    device = fleet.device()
    topic = TOPICS.telemetry(device.device_id)
    now = time.time()
    first_pid = fleet.bridge.ingest_pid
    assert first_pid is not None
    for seq in range(1, 101):
        device.publish(topic, telemetry(seq, now))
    os.kill(first_pid, signal.SIGKILL)  # while those are on their way or being written
    for seq in range(101, 201):
        device.publish(topic, telemetry(seq, now))
    assert eventually(lambda: fleet.db_count(HealthRow) == 200, timeout=3 * WAIT)
    assert fleet.bridge.drain()
    assert fleet.db_count(HealthRow) == 200  # each once, though a batch may have gone twice
    assert fleet.bridge.ingest_pid not in (None, first_pid)
    device.close()
