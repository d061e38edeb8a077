"""The ingest layer on a real database: dedupe, unknown devices, retention."""

from __future__ import annotations

import datetime as dt
import time
from typing import cast

from sqlalchemy import Table, func, insert, select

from fleet_server.db import transaction
from fleet_server.mqtt.bulk import insert_rows
from fleet_server.mqtt.ingest import Received, prune, write_batch
from fleet_server.tables import HealthRow, InferenceRow, SeenMessage
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


def test_bulk_rows_read_back_as_if_the_orm_had_written_them(server: Server) -> None:
    # insert_rows bypasses SQLAlchemy's executemany (COPY on PostgreSQL, the driver's own
    # executemany on SQLite) but applies each column type's conversions itself.
    row = {
        "device_id": "bulk",
        "ts": dt.datetime.fromtimestamp(time.time(), dt.UTC),
        "model_name": "digits",
        "model_version": "1.0.0",
        "window_s": 60.0,
        "count": 10,
        "errors": 1,
        "latency_p50_ms": 0.25,
        "latency_p95_ms": 0.5,
        "latency_p99_ms": 1.5e-3,
        "mean_confidence": None,
        "class_counts": [0, 0, 9],
        "nan_outputs": 0,
        "drift_score": 0.125,
    }
    table = cast(Table, InferenceRow.__table__)
    with transaction(server.state.sessions) as session:
        insert_rows(session, table, [row])
        session.execute(insert(table), [{**row, "device_id": "orm"}])
    with transaction(server.state.sessions) as session:
        bulk, orm = (
            session.scalars(select(InferenceRow).where(InferenceRow.device_id == d)).one()
            for d in ("bulk", "orm")
        )
        columns = [c.key for c in table.columns if c.key not in ("id", "device_id")]
        assert [getattr(bulk, c) for c in columns] == [getattr(orm, c) for c in columns]
        assert (bulk.class_counts, bulk.latency_p99_ms, bulk.mean_confidence) == (
            [0, 0, 9],
            1.5e-3,
            None,
        )
