"""Writing what devices send: batched, deduplicated, and never stopped by one bad message."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, delete, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from fleet_server.mqtt.bulk import insert_rows
from fleet_server.tables import (
    AccuracyRow,
    Device,
    HealthRow,
    InferenceRow,
    SeenMessage,
    ShadowRow,
    UpdateReportRow,
    utcnow,
)
from protocol.messages import Availability, DevicePayload, TelemetryBatch, UpdateReport, UpdateState


@dataclass(frozen=True)
class Received:
    device_id: str
    message: DevicePayload
    received_at: dt.datetime


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _key(item: Received) -> tuple[str, str, int] | None:
    message = item.message
    if isinstance(message, UpdateReport):
        return (item.device_id, "reports", message.msg_id)
    if isinstance(message, TelemetryBatch):
        return (item.device_id, "telemetry", message.seq)
    return None  # availability is a retained state, not a stream: the latest simply wins


def _claim(session: Session, keys: Sequence[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
    """Record the keys; return the ones not seen before. Atomic per key, so two server
    replicas handed the same redelivery store it once between them."""
    if not keys:
        return set()
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":
        # Three arrays, not thousands of parameters: the statement stays small to send
        # and to parse, however large the batch.
        devices, streams, seqs = (list(column) for column in zip(*keys, strict=True))
        unnest = text(
            "INSERT INTO seen_messages (device_id, stream, seq, received_at) "
            "SELECT d, s, q, :now FROM unnest("
            "CAST(:devices AS VARCHAR[]), CAST(:streams AS VARCHAR[]), CAST(:seqs AS BIGINT[])"
            ") AS k(d, s, q) "
            "ON CONFLICT DO NOTHING RETURNING device_id, stream, seq"
        )
        params = {"now": now, "devices": devices, "streams": streams, "seqs": seqs}
        return {(r[0], r[1], r[2]) for r in session.execute(unnest, params)}
    table = cast(Table, SeenMessage.__table__)
    seen = table.c
    stmt = (
        sqlite.insert(table)  # Core, not ORM: no ORM loading of what returns
        .on_conflict_do_nothing()
        .returning(seen.device_id, seen.stream, seen.seq)
    )
    rows = [{"device_id": d, "stream": s, "seq": q, "received_at": now} for d, s, q in keys]
    return {(r[0], r[1], r[2]) for r in session.execute(stmt, rows)}


@dataclass
class BatchResult:
    stored: int = 0
    duplicates: int = 0
    unknown_device: int = 0


@dataclass
class _Rows:
    """One batch, as rows per table: written with one multi-row INSERT each."""

    tables: dict[type, list[dict[str, Any]]] = field(default_factory=dict)
    # Per device, the column values its messages leave behind (later messages win).
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, table: type, row: dict[str, Any]) -> None:
        self.tables.setdefault(table, []).append(row)


def write_batch(session: Session, items: Sequence[Received]) -> BatchResult:
    result = BatchResult()
    ids = {i.device_id for i in items}
    known = set(
        session.scalars(
            select(Device.id).where(Device.id.in_(ids), Device.decommissioned_at.is_(None))
        )
    )
    fresh: list[Received] = []
    for item in items:
        if item.device_id not in known:
            result.unknown_device += 1
        else:
            fresh.append(item)
    keys = [k for k in dict.fromkeys(_key(i) for i in fresh) if k is not None]
    claimed = _claim(session, keys)
    rows = _Rows()
    for item in fresh:
        key = _key(item)
        if key is not None:
            if key not in claimed:
                result.duplicates += 1
                continue
            claimed.discard(key)  # a second copy within this batch is a duplicate too
        _collect(rows, item)
        result.stored += 1
    for table, table_rows in rows.tables.items():
        insert_rows(session, table.__table__, table_rows)  # type: ignore[attr-defined]
    for device_id, values in rows.devices.items():
        session.execute(update(Device).where(Device.id == device_id).values(**values))
    return result


def _collect(rows: _Rows, item: Received) -> None:
    message, device_id = item.message, item.device_id
    device = rows.devices.setdefault(device_id, {})
    device["last_seen_at"] = item.received_at
    if isinstance(message, Availability):
        device["status"] = message.state
        if message.agent_version:
            device["agent_version"] = message.agent_version
    elif isinstance(message, UpdateReport):
        rows.add(UpdateReportRow, _report_row(device_id, message))
        if message.state == UpdateState.ACTIVE:
            device["model_name"] = message.model_name
            device["model_version"] = message.model_version
    else:
        device["status"] = "online"
        for table, row in _telemetry_rows(device_id, message):
            rows.add(table, row)


def _report_row(device_id: str, r: UpdateReport) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "msg_id": r.msg_id,
        "ts": _when(r.ts),
        "deployment_id": r.deployment_id,
        "desired_seq": r.desired_seq,
        "state": r.state.value,
        "model_name": r.model_name,
        "model_version": r.model_version,
        "reason": r.reason,
    }


def _telemetry_rows(device_id: str, batch: TelemetryBatch) -> Iterable[tuple[type, dict[str, Any]]]:
    # Every sample type maps field for field onto its table, plus the device and a datetime.
    for table, samples in (
        (HealthRow, batch.health),
        (InferenceRow, batch.inference),
        (AccuracyRow, batch.accuracy),
        (ShadowRow, batch.shadow),
    ):
        for sample in samples:
            # A frozen dataclass's __dict__ holds its fields, in order: copying it is a
            # fraction of the cost of a getattr per field.
            row = dict(vars(sample))
            row["ts"] = _when(sample.ts)
            row["device_id"] = device_id
            if "class_counts" in row:
                row["class_counts"] = list(row["class_counts"])
            yield table, row


def prune(session: Session, older_than: dt.datetime) -> int:
    """Drop telemetry and dedupe keys past the retention window."""
    removed = 0
    for table in (HealthRow, InferenceRow, AccuracyRow, ShadowRow):
        removed += session.execute(delete(table).where(table.ts < older_than)).rowcount or 0  # type: ignore[attr-defined]
    removed += (
        session.execute(delete(SeenMessage).where(SeenMessage.received_at < older_than)).rowcount  # type: ignore[attr-defined]
        or 0
    )
    return removed
