"""What the console's pages show, read with aggregated queries.

A week of telemetry from 1,000 devices at one sample per 10 s is some 60 million rows per
table, so no page reads raw rows: charts group a device's samples into about 120 time
buckets in SQL (on the (device, ts) indexes), and fleet-wide figures group recent windows
by device or by model version.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Integer, cast, extract, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from fleet_server.console.charts import Series
from fleet_server.rollouts.states import ACTIVE_STATES
from fleet_server.tables import (
    AccuracyRow,
    Device,
    HealthRow,
    InferenceRow,
    ModelVersion,
    Rollout,
    UpdateReportRow,
)
from protocol.manifest import Manifest, ManifestError, parse_manifest, semver_key

# The time ranges a device page offers, and how many points a chart gets over any of them.
RANGES = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86_400, "7d": 7 * 86_400}
POINTS = 120

# What counts as failing health, over the last HEALTH_WINDOW of samples.
HEALTH_WINDOW = dt.timedelta(minutes=10)
MAX_CPU_PERCENT = 90.0
MAX_MEMORY_PERCENT = 90.0
MAX_TEMPERATURE_C = 80.0
MIN_DISK_FREE_BYTES = 256 * 2**20


def _bucket(session: Session, column: Any, width: int) -> ColumnElement[Any]:
    """The index of the `width`-second bucket a timestamp column falls in, counted from
    1970, in this database's own terms."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLAlchemy stores SQLite datetimes as UTC text, which strftime reads; integer
        # division is the floor here, and needs no math functions (SQLite builds without
        # them, such as the one TensorFlow's libraries bring along, have no floor()).
        return cast(func.strftime("%s", column), Integer) // width
    return func.floor(extract("epoch", column) / width)


# --- a device's charts ----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCharts:
    start: float
    end: float
    health: list[Series]  # CPU and memory, %
    temperature: list[Series]
    latency: list[Series]  # p50 and p95, ms
    throughput: list[Series]  # predictions per second
    accuracy: list[Series]
    drift: list[Series]


def device_charts(session: Session, device_id: str, span_s: int, now: dt.datetime) -> DeviceCharts:
    width = max(span_s // POINTS, 10)
    since = now - dt.timedelta(seconds=span_s)
    first = int(since.timestamp()) // width
    buckets = range(first, first + span_s // width + 2)

    def grouped(
        table: type[Any], *columns: ColumnElement[Any]
    ) -> dict[int, tuple[float | None, ...]]:
        ts: InstrumentedAttribute[dt.datetime] = table.ts
        bucket = _bucket(session, ts, width).label("bucket")
        rows = session.execute(
            select(bucket, *columns)
            .where(table.device_id == device_id, ts >= since)
            .group_by(bucket)
        )
        return {int(row[0]): tuple(row[1:]) for row in rows}

    health = grouped(
        HealthRow,
        func.avg(HealthRow.cpu_percent),
        func.avg(HealthRow.memory_percent),
        func.avg(HealthRow.temperature_c),
    )
    inference = grouped(
        InferenceRow,
        # Percentiles cannot be merged exactly; a bucket shows its windows' mean p50 and
        # the worst p95, so a spike is never averaged away.
        func.avg(InferenceRow.latency_p50_ms),
        func.max(InferenceRow.latency_p95_ms),
        func.sum(InferenceRow.count),
        func.avg(InferenceRow.drift_score),
    )
    accuracy = grouped(
        AccuracyRow,
        func.sum(AccuracyRow.correct),
        func.sum(AccuracyRow.labelled),
    )

    def line(
        rows: dict[int, tuple[float | None, ...]], pick: int, scale: float = 1.0
    ) -> list[tuple[float, float | None]]:
        points: list[tuple[float, float | None]] = []
        for b in buckets:
            value = rows.get(b, (None,) * (pick + 1))[pick]
            points.append(((b + 0.5) * width, None if value is None else float(value) * scale))
        return points

    def ratio(b: int) -> float | None:
        correct, labelled = accuracy.get(b, (None, None))
        return float(correct or 0) / float(labelled) if labelled else None

    return DeviceCharts(
        start=since.timestamp(),
        end=now.timestamp(),
        health=[Series("CPU %", "s1", line(health, 0)), Series("memory %", "s2", line(health, 1))],
        temperature=[Series("°C", "s3", line(health, 2))],
        latency=[
            Series("p50", "s1", line(inference, 0)),
            Series("p95", "s2", line(inference, 1)),
        ],
        throughput=[Series("predictions/s", "s1", line(inference, 2, 1.0 / width))],
        accuracy=[Series("accuracy", "s1", [((b + 0.5) * width, ratio(b)) for b in buckets])],
        drift=[Series("drift", "s3", line(inference, 3))],
    )


def update_history(session: Session, device_id: str, limit: int = 30) -> list[UpdateReportRow]:
    return list(
        session.scalars(
            select(UpdateReportRow)
            .where(UpdateReportRow.device_id == device_id)
            .order_by(UpdateReportRow.ts.desc(), UpdateReportRow.id.desc())
            .limit(limit)
        )
    )


# --- the fleet at a glance --------------------------------------------------------------


@dataclass(frozen=True)
class Unhealthy:
    device_id: str
    name: str
    problems: list[str]


def failing_health(session: Session, now: dt.datetime, limit: int = 20) -> list[Unhealthy]:
    """Online devices whose recent samples cross a health limit: mean CPU or memory, the
    hottest temperature, the least free disk."""
    cpu = func.avg(HealthRow.cpu_percent)
    memory = func.avg(HealthRow.memory_percent)
    temperature = func.max(HealthRow.temperature_c)
    disk = func.min(HealthRow.disk_free_bytes)
    rows = session.execute(
        select(HealthRow.device_id, Device.name, cpu, memory, temperature, disk)
        .join(Device, Device.id == HealthRow.device_id)
        .where(HealthRow.ts >= now - HEALTH_WINDOW, Device.status == "online")
        .group_by(HealthRow.device_id, Device.name)
        .having(
            (cpu >= MAX_CPU_PERCENT)
            | (memory >= MAX_MEMORY_PERCENT)
            | (temperature >= MAX_TEMPERATURE_C)
            | (disk < MIN_DISK_FREE_BYTES)
        )
        .order_by(HealthRow.device_id)
        .limit(limit)
    )
    found = []
    for device_id, name, c, m, t, d in rows:
        problems = []
        if c is not None and c >= MAX_CPU_PERCENT:
            problems.append(f"CPU {c:.0f} %")
        if m is not None and m >= MAX_MEMORY_PERCENT:
            problems.append(f"memory {m:.0f} %")
        if t is not None and t >= MAX_TEMPERATURE_C:
            problems.append(f"{t:.0f} °C")
        if d is not None and d < MIN_DISK_FREE_BYTES:
            problems.append(f"{d / 2**20:.0f} MiB disk free")
        found.append(Unhealthy(device_id, name, problems))
    return found


@dataclass(frozen=True)
class Overview:
    by_status: dict[str, int]
    by_version: list[tuple[str, str, int]]  # model name, version ("" for none), devices
    unhealthy: list[Unhealthy]
    active_rollouts: list[Rollout]


def overview(session: Session, now: dt.datetime) -> Overview:
    present = Device.decommissioned_at.is_(None)
    by_status = {
        status: count
        for status, count in session.execute(
            select(Device.status, func.count()).where(present).group_by(Device.status)
        )
    }
    versions = session.execute(
        select(Device.model_name, Device.model_version, func.count())
        .where(present)
        .group_by(Device.model_name, Device.model_version)
    )
    by_version = sorted(
        ((name or "", version or "", count) for name, version, count in versions),
        key=lambda row: (row[0], _version_key(row[1])),
    )
    active = list(
        session.scalars(
            select(Rollout).where(Rollout.state.in_(ACTIVE_STATES)).order_by(Rollout.id.desc())
        )
    )
    return Overview(by_status, by_version, failing_health(session, now), active)


def _version_key(version: str) -> tuple[Any, ...]:
    try:
        return (0, semver_key(version))
    except ValueError:
        return (1, version)


# --- models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    row: ModelVersion
    manifest: Manifest | None
    devices: int  # running it now

    @property
    def key(self) -> tuple[str, str]:
        return (self.row.name, self.row.version)


def model_rows(session: Session) -> list[ModelRow]:
    running = {
        (name, version): count
        for name, version, count in session.execute(
            select(Device.model_name, Device.model_version, func.count())
            .where(Device.decommissioned_at.is_(None), Device.model_version.is_not(None))
            .group_by(Device.model_name, Device.model_version)
        )
    }
    rows = []
    for model in session.scalars(select(ModelVersion)):
        try:
            manifest: Manifest | None = parse_manifest(model.manifest_json.encode()).manifest
        except ManifestError:
            manifest = None  # stored before a schema change; the row's own columns remain
        rows.append(ModelRow(model, manifest, running.get((model.name, model.version), 0)))
    return sorted(rows, key=lambda r: (r.row.name, _version_key(r.row.version)))
