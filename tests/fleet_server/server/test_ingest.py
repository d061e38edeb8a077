"""The ingest layer on a real database: dedupe, unknown devices, retention."""

from __future__ import annotations

import datetime as dt
import time

from sqlalchemy import func, select

from fleet_server.db import transaction
from fleet_server.models import HealthRow, SeenMessage
from fleet_server.mqtt.ingest import Received, prune, write_batch
from protocol.messages import HealthSample, TelemetryBatch
from tests.fleet_server.server.conftest import Server


def _batch(seq: int, ts: float) -> TelemetryBatch:
    sample = HealthSample(ts, 10.0, 20.0, 1000, None, 10**9, 5.0, "0.1.0")
    return TelemetryBatch(1, seq, ts, 0, (sample,), (), (), ())


def _count(server: Server, model: type) -> int:
    with transaction(server.state.sessions) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_a_batch_stores_each_message_once_and_skips_strangers(server: Server) -> None:
    device = server.enroll()["device_id"]
    now = time.time()
    received = dt.datetime.now(dt.UTC)
    items = [
        Received(device, _batch(1, now), received),
        Received(device, _batch(1, now), received),  # redelivered within the batch
        Received(device, _batch(2, now), received),
        Received("dev-stranger", _batch(1, now), received),
    ]
    with transaction(server.state.sessions) as session:
        result = write_batch(session, items)
    assert (result.stored, result.duplicates, result.unknown_device) == (2, 1, 1)
    with transaction(server.state.sessions) as session:
        again = write_batch(session, items[:1])  # redelivered in a later batch
    assert (again.stored, again.duplicates) == (0, 1)
    assert _count(server, HealthRow) == 2


def test_prune_drops_what_is_past_retention(server: Server) -> None:
    device = server.enroll()["device_id"]
    now = time.time()
    old = now - 40 * 86400
    received = dt.datetime.now(dt.UTC)
    with transaction(server.state.sessions) as session:
        write_batch(session, [Received(device, _batch(1, old), received)])
        write_batch(session, [Received(device, _batch(2, now), received)])
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    with transaction(server.state.sessions) as session:
        removed = prune(session, cutoff)
    assert removed == 1
    assert _count(server, HealthRow) == 1
    assert _count(server, SeenMessage) == 2  # dedupe keys age by arrival, not by sample time
