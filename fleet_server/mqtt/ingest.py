"""Writing what devices send: batched, deduplicated, and never stopped by one bad message."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fleet_server.models import (
    AccuracyRow,
    Device,
    HealthRow,
    InferenceRow,
    SeenMessage,
    ShadowRow,
    UpdateReportRow,
    utcnow,
)
from protocol.messages import Availability, TelemetryBatch, UpdateReport, UpdateState

Payload = Availability | UpdateReport | TelemetryBatch


@dataclass(frozen=True)
class Received:
    device_id: str
    message: Payload
    received_at: dt.datetime
    mid: int = 0  # the MQTT packet id, acked once the message is stored
    qos: int = 0


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
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    stmt = (
        insert(SeenMessage)
        .on_conflict_do_nothing()
        .returning(SeenMessage.device_id, SeenMessage.stream, SeenMessage.seq)
    )
    rows = [{"device_id": d, "stream": s, "seq": q, "received_at": now} for d, s, q in keys]
    return {tuple(r) for r in session.execute(stmt, rows)}  # type: ignore[misc]


@dataclass
class BatchResult:
    stored: int = 0
    duplicates: int = 0
    unknown_device: int = 0


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
    seen_in_batch: set[tuple[str, str, int]] = set()
    for item in fresh:
        key = _key(item)
        if key is not None and (key not in claimed or key in seen_in_batch):
            result.duplicates += 1
            continue
        if key is not None:
            seen_in_batch.add(key)
        _store(session, item)
        result.stored += 1
    return result


def _store(session: Session, item: Received) -> None:
    message, device_id = item.message, item.device_id
    if isinstance(message, Availability):
        session.execute(
            update(Device)
            .where(Device.id == device_id)
            .values(
                status=message.state,
                last_seen_at=item.received_at,
                **({"agent_version": message.agent_version} if message.agent_version else {}),
            )
        )
    elif isinstance(message, UpdateReport):
        session.add(_report_row(device_id, message))
        values: dict[str, object] = {"last_seen_at": item.received_at}
        if message.state == UpdateState.ACTIVE:
            values |= {"model_name": message.model_name, "model_version": message.model_version}
        session.execute(update(Device).where(Device.id == device_id).values(**values))
    else:
        session.add_all(_telemetry_rows(device_id, message))
        session.execute(
            update(Device)
            .where(Device.id == device_id)
            .values(last_seen_at=item.received_at, status="online")
        )


def _report_row(device_id: str, r: UpdateReport) -> UpdateReportRow:
    return UpdateReportRow(
        device_id=device_id,
        msg_id=r.msg_id,
        ts=_when(r.ts),
        deployment_id=r.deployment_id,
        desired_seq=r.desired_seq,
        state=r.state.value,
        model_name=r.model_name,
        model_version=r.model_version,
        reason=r.reason,
    )


def _telemetry_rows(
    device_id: str, batch: TelemetryBatch
) -> Iterable[HealthRow | InferenceRow | AccuracyRow | ShadowRow]:
    for h in batch.health:
        yield HealthRow(
            device_id=device_id,
            ts=_when(h.ts),
            cpu_percent=h.cpu_percent,
            memory_percent=h.memory_percent,
            memory_rss_bytes=h.memory_rss_bytes,
            temperature_c=h.temperature_c,
            disk_free_bytes=h.disk_free_bytes,
            uptime_s=h.uptime_s,
            agent_version=h.agent_version,
        )
    for s in batch.inference:
        yield InferenceRow(
            device_id=device_id,
            ts=_when(s.ts),
            model_name=s.model_name,
            model_version=s.model_version,
            window_s=s.window_s,
            count=s.count,
            errors=s.errors,
            latency_p50_ms=s.latency_p50_ms,
            latency_p95_ms=s.latency_p95_ms,
            latency_p99_ms=s.latency_p99_ms,
            mean_confidence=s.mean_confidence,
            class_counts=list(s.class_counts),
            nan_outputs=s.nan_outputs,
            drift_score=s.drift_score,
        )
    for a in batch.accuracy:
        yield AccuracyRow(
            device_id=device_id,
            ts=_when(a.ts),
            model_name=a.model_name,
            model_version=a.model_version,
            window_s=a.window_s,
            labelled=a.labelled,
            correct=a.correct,
        )
    for sh in batch.shadow:
        yield ShadowRow(
            device_id=device_id,
            ts=_when(sh.ts),
            active_version=sh.active_version,
            candidate_version=sh.candidate_version,
            compared=sh.compared,
            agreed=sh.agreed,
        )


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
