"""The web console at fleet scale: every page over 1,000 devices and a week of telemetry.

The issue asks that the console stay fast with 1,000 devices reporting one sample per 10 s
for a week (60,480 samples per device in each telemetry table, some 60 million rows per
table), its pages rendered from aggregated queries rather than raw rows. Per database:

- a fresh database, its schema made by the real migrations, seeded inside the database
  (INSERT ... SELECT over a recursive CTE on SQLite, over generate_series on PostgreSQL) in
  time order, as a live fleet writes it: one instant from every reporting device, then the
  next, so that one device's rows lie scattered over its table as they would. The
  telemetry indexes are dropped for the load and made again from the migrations' own DDL;
  then the seeder keeps topping telemetry up to the present, as the fleet would;
- each page fetched through the real app (FastAPI TestClient, signed in with the
  console's session cookie): a warm-up request, then REQUESTS timed ones; the bytes sent,
  against the raw rows a device page's charts would need shipped instead;
- every SQL statement one request of each page issues, recorded and explained
  (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL): full scans are reported.

Seeding every device's week takes this 2-core machine longer than the run should (see
the section), so by default the whole week is seeded for FULL_DEVICES devices and the last
day for the others. No page measured reads anything else for that: a device page reads one
device's rows (a device with the whole week), the overview and models pages read the last
minutes of every device, the device list and rollouts read no telemetry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event, func, insert, select, text

from fleet_server.console import pages as console_pages
from fleet_server.console import queries

# The scale.
DEVICES = 1000
HISTORY_S = 7 * 86_400
INTERVAL_S = 10
# What is seeded of it: the whole week for these devices, RECENT_S for the others.
FULL_DEVICES = 100
RECENT_S = 86_400
REQUESTS = 5
TARGET_S = 1.0  # the page target: every request of every page under this

MODEL = "digits"
VERSIONS = ("1.0.0", "1.1.0", "2.0.0")
TELEMETRY = ("health_samples", "inference_windows", "accuracy_windows")
# The columns a device page charts, per table: what shipping raw rows would have to send.
CHARTED = {
    "health_samples": ("ts", "cpu_percent", "memory_percent", "temperature_c"),
    "inference_windows": ("ts", "latency_p50_ms", "latency_p95_ms", "count", "drift_score"),
    "accuracy_windows": ("ts", "correct", "labelled"),
}
CHUNK_STEPS = 360  # time steps (an hour) per INSERT ... SELECT
SITES = 20
TAG = "region-eu"  # the device list's filter: half the fleet, so page 3 exists

# What the overview and models pages aggregate, every device's last:
HEALTH_S = int(queries.HEALTH_WINDOW.total_seconds())
FIELD_S = int(console_pages.FIELD_WINDOW.total_seconds())

POSTGRES_ENV = "EDGEFLEET_BENCH_POSTGRES_URL"
SQLITE = "SQLite"
POSTGRES = "PostgreSQL"
GOLDEN_MANIFEST = Path(__file__).resolve().parents[1] / "tests/protocol/golden/manifest.json"


# --- figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reads:
    """Telemetry rows a page aggregates: `table`, stamped in the last `span_s` seconds, of
    one device or (None) every device, or every online device."""

    table: str
    span_s: int
    device: str | None = None
    online_only: bool = False


@dataclass(frozen=True)
class Page:
    label: str
    path: str
    reads: tuple[Reads, ...] = ()

    @property
    def device_page(self) -> bool:
        return any(r.device is not None for r in self.reads)


@dataclass(frozen=True)
class PageFigures:
    page: Page
    status: int
    first_s: float  # the warm-up request; on SQLite, cold (see `cold`)
    cold: bool  # the database's files were evicted from the OS page cache before it
    first_read_bytes: int | None  # what this process read from storage during it
    times_s: tuple[float, ...]  # the timed requests
    sent_bytes: int
    rows_read: int  # telemetry rows in what the page aggregates
    raw_values: int | None  # device pages: those rows x the columns the charts show
    raw_bytes: int | None  # ... as compact JSON arrays
    statements: int  # SQL statements one request issued
    slowest_sql_s: float
    slowest_plan: tuple[str, ...]  # the table accesses of the slowest statement
    plans: tuple[str, ...]  # every table access in those statements' plans, once each
    scans: tuple[str, ...]  # of them, the full scans of a table or of an index

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    @property
    def raw_ratio(self) -> float | None:
        return self.raw_bytes / self.sent_bytes if self.raw_bytes and self.sent_bytes else None


@dataclass(frozen=True)
class BackendFigures:
    label: str  # SQLITE or POSTGRES
    rows: tuple[tuple[str, int], ...]  # telemetry table, rows at the end of the run
    table_rows: tuple[tuple[str, int], ...]  # every scanned table's rows, for the findings
    db_bytes: int
    seed_s: float  # the INSERT ... SELECTs
    index_s: float  # making the telemetry indexes again
    setup_s: float  # devices, tags, models, rollouts, update history
    pages: tuple[PageFigures, ...]

    @property
    def telemetry_rows(self) -> int:
        return sum(n for _, n in self.rows)

    def rows_of(self, table: str) -> int:
        return dict(self.table_rows + self.rows).get(table, 0)


@dataclass(frozen=True)
class ConsoleFigures:
    machine: str
    devices: int
    full_devices: int
    history_s: int
    recent_s: int
    interval_s: int
    requests: int
    online: int
    versions: tuple[tuple[str, int], ...]  # model version, devices running it
    backends: tuple[BackendFigures, ...]
    postgres_note: str | None  # why PostgreSQL was not measured, if it was not
    total_s: float

    @property
    def full_rows_per_table(self) -> int:
        """Rows per telemetry table if every device had the whole history."""
        return self.devices * (self.history_s // self.interval_s)


# --- seeding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    devices: int
    full_devices: int
    history_s: int
    recent_s: int
    interval_s: int

    @property
    def steps(self) -> int:
        return self.history_s // self.interval_s

    @property
    def stride(self) -> int:
        return max(1, self.devices // max(1, self.full_devices))

    def full(self, n: int) -> bool:
        """The devices seeded with the whole history: spread over the fleet."""
        return n % self.stride == 0 and n // self.stride < self.full_devices

    def first_step(self, n: int) -> int:
        return 0 if self.full(n) else max(0, self.steps - self.recent_s // self.interval_s)


def device_id(n: int) -> str:
    return f"dev-{n:04d}"


def online(n: int) -> bool:
    return (n * 7) % 10 < 5  # half the fleet, not lined up with any tag


def version_of(n: int) -> str:
    return VERSIONS[0] if n % 10 < 2 else VERSIONS[1] if n % 10 < 5 else VERSIONS[2]


def hot(n: int) -> bool:
    """A device whose health crosses the console's limits (CPU, temperature)."""
    return n % 97 == 13


def tags_of(n: int) -> list[str]:
    tags = ["region-eu" if n % 2 == 0 else "region-us", f"site-{(n // 10) % SITES:02d}"]
    return [*tags, "canary"] if n % 50 == 0 else tags


def _noise(dialect: str) -> str:
    """A uniform value in [0, 1), fresh per row."""
    return "(abs(random() % 1000) / 1000.0)" if dialect == "sqlite" else "random()"


def telemetry_sql(table: str, dialect: str) -> str:
    """INSERT ... SELECT of `table`'s samples at steps :first..:last of every device of
    bench_devices reporting by then, one instant of every device after another."""
    noise = _noise(dialect)
    # A daily swing in [-1, 1], as a triangle: SQLite's sin() exists only in builds with
    # its math functions, and the one TensorFlow's libraries bring along has none.
    day = "(abs((:start + t.i * :interval) % 86400 - 43200) / 21600.0 - 1)"
    if dialect == "sqlite":
        source = (
            "WITH RECURSIVE t(i, stamp) AS ("
            "SELECT :first, strftime('%Y-%m-%d %H:%M:%S', :start + :first * :interval, "
            "'unixepoch') UNION ALL SELECT i + 1, strftime('%Y-%m-%d %H:%M:%S', "
            ":start + (i + 1) * :interval, 'unixepoch') FROM t WHERE i < :last) "
        )
        # SQLAlchemy's own text for a DateTime on SQLite: UTC, to the microsecond.
        ts = "t.stamp || d.micro_text"
        rows = "FROM t CROSS JOIN bench_devices AS d WHERE d.first_step <= t.i"
        counts = "printf('[" + ",".join(["%d"] * 10) + "]', {})"
    else:
        source = ""
        ts = (
            "to_timestamp(CAST(:start AS bigint) + t.i * CAST(:interval AS integer)) "
            "+ d.micro * interval '1 microsecond'"
        )
        rows = (
            "FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS t(i) "
            "CROSS JOIN bench_devices AS d WHERE d.first_step <= t.i ORDER BY t.i, d.n"
        )
        counts = "CAST(format('[" + ",".join(["%s"] * 10) + "]', {}) AS json)"
    if table == "health_samples":
        values = {
            "device_id": "d.id",
            "ts": ts,
            "cpu_percent": f"CASE WHEN d.hot = 1 THEN 91 + 8 * {noise} "
            f"ELSE 12 + 40 * d.load + 10 * {day} + 8 * {noise} END",
            "memory_percent": f"30 + 35 * d.load + 5 * {noise}",
            "memory_rss_bytes": f"48000000 + d.n * 9973 + CAST(4000000 * {noise} AS integer)",
            "temperature_c": f"CASE WHEN d.hot = 1 THEN 79 + 6 * {noise} "
            f"ELSE 42 + 12 * d.load + 6 * {day} + 2 * {noise} END",
            "disk_free_bytes": "6000000000 - d.n * 1000003 - t.i * 1500",
            "uptime_s": "CAST((t.i - d.first_step) * :interval + 3600 + d.n AS double precision)",
            "agent_version": "'0.1.0'",
        }
    elif table == "inference_windows":
        # Deterministic, so that every mention of it is the same number.
        count = "(40 + CAST(60 * d.load AS integer) + (t.i * 7 + d.n * 13) % 21)"
        per_class = f"{count} / 10"
        values = {
            "device_id": "d.id",
            "ts": ts,
            "model_name": f"'{MODEL}'",
            "model_version": "d.version",
            "window_s": "CAST(:interval AS double precision)",
            "count": count,
            "errors": "CASE WHEN (t.i + d.n) % 97 = 0 THEN 1 ELSE 0 END",
            "latency_p50_ms": f"1.8 + 2.5 * d.load + 0.4 * {noise}",
            "latency_p95_ms": f"3.2 + 4.5 * d.load + 1.5 * {noise}",
            "latency_p99_ms": f"4.8 + 6.0 * d.load + 3.0 * {noise}",
            "mean_confidence": f"0.93 - 0.05 * d.load + 0.03 * {noise}",
            "class_counts": counts.format(
                ", ".join([per_class] * 9 + [f"{count} - 9 * ({per_class})"])
            ),
            "nan_outputs": "0",
            "drift_score": f"0.02 + 0.08 * d.load + 0.02 * {noise}",
        }
    elif table == "accuracy_windows":
        labelled = "((t.i * 3 + d.n) % 7)"
        values = {
            "device_id": "d.id",
            "ts": ts,
            "model_name": f"'{MODEL}'",
            "model_version": "d.version",
            "window_s": "CAST(:interval AS double precision)",
            "labelled": labelled,
            "correct": f"{labelled} - CASE WHEN {labelled} > 0 AND "
            "(t.i + d.n * 5) % 11 <= CAST(2 * d.load AS integer) THEN 1 ELSE 0 END",
        }
    else:
        raise ValueError(f"no telemetry table {table!r}")
    return (
        f"{source}INSERT INTO {table} ({', '.join(values)}) "
        f"SELECT {', '.join(values.values())} {rows}"
    )


class Seeder:
    """Writes the fleet's telemetry, on a connection of its own (bench_devices is a
    temporary table on it): the history first, then top-ups to the present."""

    def __init__(self, engine: Engine, scale: Scale, start: int) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.scale = scale
        self.start = start  # unix seconds of step 0
        self.done = 0  # steps written
        self.connection = engine.connect()
        self.statements = {t: text(telemetry_sql(t, self.dialect)) for t in TELEMETRY}
        self.seed_s = 0.0
        self.index_s = 0.0

    def close(self) -> None:
        self.connection.close()
        self.engine.dispose()

    def _execute(self, sql: str, **params: Any) -> None:
        self.connection.execute(text(sql), params)

    def prepare(self) -> None:
        if self.dialect == "sqlite":
            self._execute("PRAGMA synchronous=OFF")
            self._execute("PRAGMA cache_size=-262144")
            micro = "micro_text TEXT, micro INTEGER"
        else:
            self._execute("SET synchronous_commit = off")
            self._execute("SET maintenance_work_mem = '512MB'")
            micro = "micro INTEGER"
        self._execute(
            f"CREATE TEMPORARY TABLE bench_devices (n INTEGER PRIMARY KEY, id TEXT, {micro}, "
            "version TEXT, load REAL, hot INTEGER, first_step INTEGER)"
        )
        self._execute("CREATE INDEX bench_devices_first_step ON bench_devices (first_step)")
        rows = []
        for n in range(self.scale.devices):
            micro_value = (n * 7919) % 1_000_000  # devices report at their own instants
            row: dict[str, Any] = {
                "n": n,
                "id": device_id(n),
                "micro": micro_value,
                "version": version_of(n),
                "load": ((n * 37) % 100) / 100.0,
                "hot": int(hot(n)),
                "first_step": self.scale.first_step(n),
            }
            if self.dialect == "sqlite":
                row["micro_text"] = f".{micro_value:06d}"
            rows.append(row)
        columns = list(rows[0])
        self.connection.execute(
            text(
                f"INSERT INTO bench_devices ({', '.join(columns)}) "
                f"VALUES ({', '.join(':' + k for k in columns)})"
            ),
            rows,
        )
        self.connection.commit()

    def _write(self, first: int, last: int) -> None:
        params = {"first": first, "last": last, "start": self.start, "interval": INTERVAL_S}
        with self.connection.begin():
            for table in TELEMETRY:
                self.connection.execute(self.statements[table], params)

    def _telemetry_indexes(self) -> list[tuple[str, str]]:
        """(name, DDL) of every secondary index on the telemetry tables, as migrated."""
        if self.dialect == "sqlite":
            query = (
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                "AND tbl_name IN ('health_samples', 'inference_windows', 'accuracy_windows')"
            )
        else:
            query = (
                "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = "
                "current_schema() AND i.tablename IN ('health_samples', 'inference_windows', "
                "'accuracy_windows') AND NOT EXISTS (SELECT 1 FROM pg_constraint k "
                "WHERE k.conname = i.indexname)"
            )
        found = [(str(name), str(ddl)) for name, ddl in self.connection.execute(text(query))]
        self.connection.commit()
        return found

    def history(self, progress: Callable[[str], None]) -> None:
        """Every step up to the start of the run, without the telemetry indexes."""
        indexes = self._telemetry_indexes()
        for name, _ in indexes:
            self._execute(f'DROP INDEX "{name}"')
        self.connection.commit()
        began = time.perf_counter()
        scale = self.scale
        everyone = min(
            (scale.first_step(n) for n in range(scale.devices) if not scale.full(n)),
            default=scale.steps,
        )
        day = 86_400 // scale.interval_s
        first = 0
        while first < scale.steps:
            # A chunk never straddles the step from which every device reports.
            end = everyone if first < everyone else scale.steps
            last = min(first + CHUNK_STEPS, end) - 1
            self._write(first, last)
            if (last + 1) // day > first // day:
                progress(f"  seeded {(last + 1) / day:.1f} of {scale.steps / day:.1f} day(s)")
            first = last + 1
        self.done = scale.steps
        self.seed_s = time.perf_counter() - began
        began = time.perf_counter()
        for _, ddl in indexes:
            self._execute(ddl)
        self.connection.commit()
        if self.dialect == "postgresql":
            self._execute("ANALYZE")  # what autovacuum does soon after such a load
            self.connection.commit()
        self.index_s = time.perf_counter() - began

    def catch_up(self) -> None:
        """The steps between the last one written and now, as the fleet kept reporting."""
        now = int(time.time())
        target = (now - self.start) // self.scale.interval_s + 1
        if target > self.done:
            self._write(self.done, target - 1)
            self.done = target


# --- the registry, devices and rollouts ---------------------------------------------------


def _manifests() -> list[dict[str, Any]]:
    """Model rows for VERSIONS, each with a manifest signed by one new key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocol.manifest import QuantizationMode, manifest_to_json, parse_manifest
    from protocol.signing import key_id, sign_manifest

    golden = parse_manifest(GOLDEN_MANIFEST.read_bytes()).manifest
    key = Ed25519PrivateKey.generate()
    modes = (QuantizationMode.FLOAT32, QuantizationMode.FLOAT16, QuantizationMode.INT8)
    rows = []
    for index, (version, mode) in enumerate(zip(VERSIONS, modes, strict=True)):
        sha = hashlib.sha256(f"{MODEL}-{version}".encode()).hexdigest()
        size = 120_000 // (1 + index)
        manifest = dataclasses.replace(
            golden,
            name=MODEL,
            version=version,
            model=dataclasses.replace(golden.model, sha256=sha, size=size),
            quantization=dataclasses.replace(golden.quantization, mode=mode),
        )
        rows.append(
            {
                "name": MODEL,
                "version": version,
                "sha256": sha,
                "size": size,
                "quantization": mode.value,
                "signed_by": key_id(key.public_key()),
                "manifest_json": manifest_to_json(sign_manifest(manifest, key)).decode(),
                "uploaded_by": "bench",
            }
        )
    return rows


def seed_fleet(session: Any, scale: Scale, now: dt.datetime) -> None:
    """Devices with tags, model versions, update history and two rollouts."""
    from fleet_server.rollouts import service
    from fleet_server.rollouts.spec import RolloutCreate
    from fleet_server.rollouts.states import RolloutState
    from fleet_server.tables import Device, DeviceTag, ModelVersion, UpdateReportRow

    session.execute(insert(ModelVersion), _manifests())
    devices, tags, reports = [], [], []
    enrolled = now - dt.timedelta(seconds=scale.history_s + 86_400)
    for n in range(scale.devices):
        up = online(n)
        devices.append(
            {
                "id": device_id(n),
                "name": f"camera-{n:04d}",
                "hardware": {"arch": "aarch64", "board": "rpi4" if n % 3 else "jetson-nano"},
                "secret_hash": hashlib.sha256(f"bench-{n}".encode()).hexdigest(),
                "status": "online" if up else "offline",
                "last_seen_at": now if up else now - dt.timedelta(hours=1 + n % 24),
                "agent_version": "0.1.0",
                "model_name": MODEL,
                "model_version": version_of(n),
                "enrolled_at": enrolled + dt.timedelta(seconds=n),
            }
        )
        tags += [{"device_id": device_id(n), "tag": tag} for tag in tags_of(n)]
        for seq, version in enumerate(VERSIONS[: VERSIONS.index(version_of(n)) + 1], 1):
            for step, state in enumerate(("downloading", "installing", "active")):
                reports.append(
                    {
                        "device_id": device_id(n),
                        "msg_id": seq * 10 + step,
                        "ts": enrolled + dt.timedelta(days=2 * seq, seconds=n + 20 * step),
                        "deployment_id": None,
                        "desired_seq": seq,
                        "state": state,
                        "model_name": MODEL,
                        "model_version": version,
                        "reason": None,
                    }
                )
    session.execute(insert(Device), devices)
    session.execute(insert(DeviceTag), tags)
    session.execute(insert(UpdateReportRow), reports)
    done = service.create(
        session,
        RolloutCreate.model_validate(
            {
                "model": MODEL,
                "version": VERSIONS[-1],
                "target": {"tags": ["canary"]},
                "waves": [{"percent": 100}],
            }
        ),
        "bench",
    )
    service.finish(done, RolloutState.COMPLETED, None)
    service.create(
        session,
        RolloutCreate.model_validate(
            {
                "model": MODEL,
                "version": VERSIONS[-1],
                "target": {"tags": ["region-us"]},
                "waves": [{"percent": 5}, {"percent": 25}, {"percent": 100}],
                "gates": {"max_error_rate": 0.02, "max_latency_ratio": 1.5},
            }
        ),
        "bench",
    )


# --- measuring ----------------------------------------------------------------------------


def console_pages_to_measure(device: str) -> list[Page]:
    health_s, field_s = HEALTH_S, FIELD_S
    found = [
        Page("overview", "/", (Reads("health_samples", health_s, online_only=True),)),
        Page("devices", "/devices"),
        Page(f"devices, tag {TAG}, page 3", f"/devices?tag={TAG}&page=3"),
    ]
    for label in ("1h", "24h", "7d"):
        span = queries.RANGES[label]
        found.append(
            Page(
                f"device, {label}",
                f"/devices/{device}?range={label}",
                tuple(Reads(t, span, device) for t in TELEMETRY),
            )
        )
    found += [
        Page(
            "models",
            "/models",
            (Reads("inference_windows", field_s), Reads("accuracy_windows", field_s)),
        ),
        Page("rollouts", "/rollouts"),
    ]
    return found


class Recorder:
    """Every statement the app's engine runs while on, with its time."""

    def __init__(self, engine: Engine) -> None:
        self.on = False
        self.statements: list[tuple[str, Any, float]] = []
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Connection, *_: Any) -> None:
        conn.info.setdefault("bench_began", []).append(time.perf_counter())

    def _after(
        self, conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any
    ) -> None:
        began = conn.info["bench_began"].pop()
        if self.on:
            self.statements.append((statement, parameters, time.perf_counter() - began))


_SQLITE_ACCESS = re.compile(r"^(SCAN|SEARCH) (\w+)(?: AS \w+)?(?: USING (.*))?$")
_PG_ACCESS = re.compile(r"(Seq Scan|Index Scan|Index Only Scan|Bitmap Heap Scan)(.*?) on (\w+)")


def explain(connection: Connection, statement: str, parameters: Any) -> list[tuple[str, bool]]:
    """(table access, whether it is a full scan) for each table the plan reads."""
    from fleet_server.db import Base

    tables = set(Base.metadata.tables)
    found: list[tuple[str, bool]] = []
    if connection.dialect.name == "sqlite":
        plan = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
        for row in plan:
            detail = str(row[-1])
            match = _SQLITE_ACCESS.match(detail)
            if match and match.group(2) in tables:
                # SCAN reads a whole table, or a whole index with USING.
                found.append((detail, match.group(1) == "SCAN"))
    else:
        plan = connection.exec_driver_sql("EXPLAIN " + statement, parameters)
        for row in plan:
            match = _PG_ACCESS.search(str(row[0]))
            if match and match.group(3) in tables:
                line = f"{match.group(1)}{match.group(2)} on {match.group(3)}"
                found.append((line, match.group(1) == "Seq Scan"))
    return found


def _in_span(reads: Reads, now: dt.datetime) -> tuple[Any, list[Any]]:
    from fleet_server.db import Base

    table = Base.metadata.tables[reads.table]
    where = [table.c.ts >= now - dt.timedelta(seconds=reads.span_s)]
    if reads.device is not None:
        where.append(table.c.device_id == reads.device)
    if reads.online_only:
        devices = Base.metadata.tables["devices"]
        online = select(devices.c.id).where(devices.c.status == "online")
        where.append(table.c.device_id.in_(online))
    return table, where


def _count(connection: Connection, reads: Reads, now: dt.datetime) -> int:
    table, where = _in_span(reads, now)
    return int(
        connection.execute(select(func.count()).select_from(table).where(*where)).scalar_one()
    )


def _raw_json_bytes(connection: Connection, reads: Reads, now: dt.datetime) -> int:
    """A device's charted columns over the span as compact JSON rows (time as unix
    seconds): what a page drawing its charts in the browser would have had to receive."""
    from fleet_server.tables import aware

    table, where = _in_span(reads, now)
    columns = [table.c[name] for name in CHARTED[reads.table]]
    rows = connection.execute(select(*columns).where(*where).order_by(table.c.ts))
    shipped = []
    for ts, *values in rows:
        moment = aware(ts)
        assert moment is not None
        shipped.append([round(moment.timestamp(), 3), *values])
    return len(json.dumps(shipped, separators=(",", ":")))


def _measure_backend(
    label: str,
    url: str | None,
    folder: Path,
    scale: Scale,
    requests: int,
    progress: Callable[[str], None],
) -> BackendFigures:
    from fastapi.testclient import TestClient

    from fleet_server.app import create_app
    from fleet_server.auth import Role
    from fleet_server.console.session import COOKIE
    from fleet_server.db import make_engine
    from fleet_server.services.tokens import create_api_token
    from fleet_server.settings import Settings
    from fleet_server.tables import utcnow

    settings = Settings(data_dir=folder, database_url=url, rollout_interval_s=0)
    app = create_app(settings)  # builds the state: the migrations make the schema
    state = app.state.fleet
    began = time.perf_counter()
    now = utcnow()
    with state.sessions() as session, session.begin():
        seed_fleet(session, scale, now)
        token = create_api_token(session, Role.viewer, "bench-console", "bench")
    setup_s = time.perf_counter() - began

    seeder = Seeder(
        make_engine(settings.resolved_database_url()),
        scale,
        int(now.timestamp()) - scale.steps * scale.interval_s + scale.interval_s,
    )
    try:
        seeder.prepare()
        progress(f"{label}: seeding telemetry")
        seeder.history(progress)
        seeder.catch_up()
        progress(
            f"{label}: seeded in {seeder.seed_s:.0f} s, indexes in {seeder.index_s:.0f} s; "
            "measuring the pages"
        )
        recorder = Recorder(state.engine)
        measured = []
        with TestClient(app, follow_redirects=False) as client:
            client.cookies.set(COOKIE, token)
            for page in console_pages_to_measure(device_id(0)):
                seeder.catch_up()
                cold = label == SQLITE and _evict(folder)
                read_before = _storage_read_bytes()
                began = time.perf_counter()
                status = client.get(page.path).status_code
                first_s = time.perf_counter() - began
                read_after = _storage_read_bytes()
                first_read = (
                    None if read_before is None or read_after is None else read_after - read_before
                )
                times, sent = [], 0
                for _ in range(requests):
                    began = time.perf_counter()
                    response = client.get(page.path)
                    times.append(time.perf_counter() - began)
                    sent = len(response.content)
                    if response.status_code != 200:
                        status = response.status_code
                recorder.statements.clear()
                recorder.on = True
                client.get(page.path)
                recorder.on = False
                statements = list(recorder.statements)
                plans: dict[str, bool] = {}
                slowest: tuple[float, tuple[str, ...]] = (0.0, ())
                now = utcnow()
                with state.engine.connect() as connection:
                    for statement, parameters, seconds in statements:
                        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
                            accesses = explain(connection, statement, parameters)
                            plans.update(accesses)
                            if seconds >= slowest[0]:
                                slowest = (seconds, tuple(a for a, _ in accesses))
                    rows_read = sum(_count(connection, r, now) for r in page.reads)
                    raw_values = raw_bytes = None
                    if page.device_page:
                        raw_values = sum(
                            _count(connection, r, now) * len(CHARTED[r.table]) for r in page.reads
                        )
                        raw_bytes = sum(_raw_json_bytes(connection, r, now) for r in page.reads)
                measured.append(
                    PageFigures(
                        page=page,
                        status=status,
                        first_s=first_s,
                        cold=cold,
                        first_read_bytes=first_read,
                        times_s=tuple(times),
                        sent_bytes=sent,
                        rows_read=rows_read,
                        raw_values=raw_values,
                        raw_bytes=raw_bytes,
                        statements=len(statements),
                        slowest_sql_s=max((s for *_, s in statements), default=0.0),
                        slowest_plan=slowest[1],
                        plans=tuple(plans),
                        scans=tuple(p for p, scan in plans.items() if scan),
                    )
                )
                progress(
                    f"  {page.path}: {status}, median {statistics.median(times) * 1000:.0f} ms"
                )
        with state.engine.connect() as connection:
            rows = tuple(
                (t, int(connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()))
                for t in TELEMETRY
            )
            scanned = {
                _table_of(scan) for p in measured for scan in p.scans if _table_of(scan)
            } - set(TELEMETRY)
            table_rows = tuple(
                (t, int(connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()))
                for t in sorted(scanned)
            )
            if connection.dialect.name == "sqlite":
                db_bytes = sum(p.stat().st_size for p in folder.glob("fleet.db*") if p.is_file())
            else:
                db_bytes = int(
                    connection.execute(
                        text("SELECT pg_database_size(current_database())")
                    ).scalar_one()
                )
    finally:
        seeder.close()
        state.engine.dispose()
    return BackendFigures(
        label=label,
        rows=rows,
        table_rows=table_rows,
        db_bytes=db_bytes,
        seed_s=seeder.seed_s,
        index_s=seeder.index_s,
        setup_s=setup_s,
        pages=tuple(measured),
    )


def _evict(folder: Path) -> bool:
    """Drop the SQLite database's files (written back first) from the OS page cache, as
    most of a week of telemetry would be once the database outgrows the memory."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.glob("fleet.db*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _storage_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (Linux)."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _table_of(access: str) -> str:
    match = _SQLITE_ACCESS.match(access)
    if match:
        return match.group(2)
    match = _PG_ACCESS.search(access)
    return match.group(3) if match else ""


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    from bench.ingest import postgres_database

    with postgres_database() as url:
        yield url


def measure(
    *,
    devices: int = DEVICES,
    full_devices: int = FULL_DEVICES,
    history_s: int = HISTORY_S,
    recent_s: int = RECENT_S,
    requests: int = REQUESTS,
    postgres: bool | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> ConsoleFigures:
    """postgres: None measures PostgreSQL when EDGEFLEET_BENCH_POSTGRES_URL is set."""
    from bench.ingest import PostgresUnavailable
    from toolchain.convert import machine_description

    began = time.perf_counter()
    scale = Scale(devices, min(full_devices, devices), history_s, recent_s, INTERVAL_S)
    backends = []
    note: str | None = None
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        backends.append(
            _measure_backend(SQLITE, None, Path(tmp) / "sqlite", scale, requests, progress)
        )
    if postgres is None:
        postgres = bool(os.environ.get(POSTGRES_ENV))
        if not postgres:
            note = f"not asked for ({POSTGRES_ENV} is not set)"
    elif not postgres:
        note = "not asked for"
    if postgres:
        try:
            with _postgres() as url, tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
                backends.append(
                    _measure_backend(POSTGRES, url, Path(tmp), scale, requests, progress)
                )
        except PostgresUnavailable as exc:
            note = f"not available ({exc})"
            progress(f"PostgreSQL {note}")
    return ConsoleFigures(
        machine=machine_description(),
        devices=devices,
        full_devices=scale.full_devices,
        history_s=history_s,
        recent_s=recent_s,
        interval_s=INTERVAL_S,
        requests=requests,
        online=sum(online(n) for n in range(devices)),
        versions=tuple((v, sum(version_of(n) == v for n in range(devices))) for v in VERSIONS),
        backends=tuple(backends),
        postgres_note=note,
        total_s=time.perf_counter() - began,
    )


# --- BENCHMARKS.md ------------------------------------------------------------------------


def _span(seconds: int) -> str:
    if seconds % 86_400 == 0:
        days = seconds // 86_400
        return "a week" if days == 7 else "24 h" if days == 1 else f"{days} days"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}" if seconds >= 0.0095 else f"{seconds * 1000:.1f}"


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:,.1f}"


def _kb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1024:,.1f}"


def markdown(figures: ConsoleFigures) -> list[str]:
    f = figures
    steps = f.history_s // f.interval_s
    recent_steps = f.recent_s // f.interval_s
    partial = f.devices - f.full_devices
    lines = [
        "## Web console at fleet scale",
        "",
        "Every console page fetched through the real app (FastAPI `TestClient`, signed in "
        "with the console's session cookie) over a fresh database whose schema the "
        f"migrations made, holding {f.devices:,} devices and telemetry at one sample per "
        f"device per {f.interval_s} s in each of `health_samples`, `inference_windows` and "
        "`accuracy_windows`. Per page: a first request, on SQLite made right after "
        "evicting the database's files from the OS page cache (`posix_fadvise` "
        "`DONTNEED`), so that it reads what it needs from the disk (*first*, cold, with the "
        "MB this process read from storage meanwhile), as it would once the database "
        "outgrows the memory; then "
        f"{f.requests} timed ones (median, max), warm; the bytes of the HTML sent (charts "
        "included, as inline SVG); the telemetry rows in what the page aggregates; every SQL "
        "statement one request issued, recorded and explained (`EXPLAIN QUERY PLAN` on "
        "SQLite, `EXPLAIN` on PostgreSQL). For the device pages, the rows their charts "
        "plot, with only the charted columns, as compact JSON arrays: what a page "
        "drawing its charts in the browser would have had to receive instead.",
        "",
        "What was seeded, inside the database (`INSERT ... SELECT` over a recursive CTE on "
        "SQLite, over `generate_series` on PostgreSQL), in time order as a live fleet "
        "writes it (one instant of every reporting device, then the next: a device's rows "
        "lie scattered over its table), the telemetry indexes dropped for the load and "
        "made again from the migrations' own DDL:",
        "",
        f"- {f.devices:,} devices, {f.online:,} online; tags `region-eu`/`region-us` "
        f"(half each), `site-00`..`site-{SITES - 1:02d}`, `canary` (every 50th); "
        f"`{MODEL}` {', '.join(f'{v} on {n:,}' for v, n in f.versions)}, the three versions "
        "registered with signed manifests; 3 update reports per version each device "
        "installed; two rollouts (one completed, one running in three waves). About 1 % "
        "of the devices report failing health (CPU over 90 %, 80 °C).",
        f"- Telemetry: {_span(f.history_s)} ({steps:,} samples per table) for "
        f"{f.full_devices:,} devices spread over the fleet"
        + (
            f", the last {_span(f.recent_s)} ({recent_steps:,} per table) for the other {partial:,}"
            if partial
            else ""
        )
        + "; then, while the pages were measured, every device's samples up to the present, "
        "as the fleet would keep reporting. Every device, online or not, reports up to the "
        "present: the most the overview and models pages can have to read.",
    ]
    if partial:
        lines.append(
            f"- Not every device has {_span(f.history_s)}: seeding that "
            f"({f.full_rows_per_table:,} rows per table) takes this machine longer than the "
            "run should (see the projection below). No page measured reads any of what was "
            "left out: a device page reads one device's rows by the `(device_id, ts)` "
            f"index, and the device measured has {_span(f.history_s)}; the overview reads "
            f"every online device's last {_span(HEALTH_S)} of health, the models page every "
            f"device's last {_span(FIELD_S)} of inference and accuracy windows; the device "
            "list and rollouts read no telemetry. What does "
            "differ is the size of the database, hence how much of it the OS can keep "
            "cached: the timed requests ran with it in the page cache, the first request of "
            "each page (SQLite) with it evicted."
        )
    lines.append("")
    for backend in f.backends:
        lines += _backend_markdown(f, backend)
    if f.postgres_note:
        lines += [f"### {POSTGRES}", "", f"Not measured: PostgreSQL was {f.postgres_note}.", ""]
    lines += [
        f"Measured on {f.machine}; the whole run took {f.total_s / 60:.1f} min. Run it "
        "with `.venv/bin/python -m bench.run --only console` (add "
        f"`{POSTGRES_ENV}=postgresql+psycopg://...` for the PostgreSQL rows; it makes and "
        "drops a database of its own there).",
        "",
    ]
    return lines


def _backend_markdown(f: ConsoleFigures, b: BackendFigures) -> list[str]:
    per_table = ", ".join(f"`{t}` {n:,}" for t, n in b.rows)
    lines = [
        f"### {b.label}",
        "",
        f"Rows at the end of the run: {per_table} ({b.telemetry_rows:,} in all); database "
        f"{b.db_bytes / 1e9:.2f} GB"
        + (" (file and WAL)" if b.label == SQLITE else "")
        + f". Seeding took {b.seed_s:.0f} s for the rows, {b.index_s:.0f} s for the indexes"
        + (" and ANALYZE" if b.label == POSTGRES else "")
        + f", {b.setup_s:.1f} s for the devices, models and rollouts.",
    ]
    seeded = b.rows_of(TELEMETRY[0])
    if f.full_devices < f.devices and seeded:
        factor = f.full_rows_per_table / seeded
        lines.append(
            f"With {_span(f.history_s)} for every device it would be "
            f"{f.full_rows_per_table:,} rows per table, about {b.db_bytes * factor / 1e9:.0f} "
            f"GB and {(b.seed_s + b.index_s) * factor / 60:.0f} min of seeding at these rates "
            "(index builds grow a little faster than the rows)."
        )
    lines += [
        "",
        "| page | status | first ms | first: MB read | median ms | max ms | KB sent "
        "| telemetry rows aggregated | raw rows as JSON, KB | raw ÷ sent | SQL statements "
        "| slowest statement ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in b.pages:
        ratio = "-" if p.raw_ratio is None else f"{p.raw_ratio:,.0f}×"
        lines.append(
            f"| `{p.page.path}` | {p.status} | {_ms(p.first_s)}{' (cold)' if p.cold else ''} "
            f"| {_mb(p.first_read_bytes)} | {_ms(p.median_s)} "
            f"| {_ms(p.max_s)} | {_kb(p.sent_bytes)} | {p.rows_read:,} "
            f"| {_kb(p.raw_bytes)} | {ratio} | {p.statements} | {_ms(p.slowest_sql_s)} |"
        )
    lines += [
        "",
        "Table accesses in the plans of every statement a page issued:",
        "",
        "| page | plan |",
        "| --- | --- |",
    ]
    for p in b.pages:
        shown = "<br>".join(f"`{plan}`" for plan in p.plans) or "-"
        lines.append(f"| `{p.page.path}` | {shown} |")
    lines += [
        "",
        f"Targets (every timed request of every page under {TARGET_S:g} s at this scale; "
        "the first request is reported beside it):",
    ]
    for p in b.pages:
        ok = p.status == 200 and p.max_s < TARGET_S
        first = f"first{' (cold)' if p.cold else ''} {_ms(p.first_s)} ms" + (
            f", {_mb(p.first_read_bytes)} MB read" if p.first_read_bytes is not None else ""
        )
        if p.first_s >= TARGET_S:
            first += f", over {TARGET_S:g} s"
        why = ""
        if not ok and p.slowest_plan:
            why = f"; its slowest statement took {_ms(p.slowest_sql_s)} ms: " + ", ".join(
                f"`{a}`" for a in p.slowest_plan
            )
        lines.append(
            f"- `{p.page.path}`: median {_ms(p.median_s)} ms, max {_ms(p.max_s)} ms — "
            f"{'met' if ok else 'MISSED'}{why} ({first})"
        )
    device_pages = [p for p in b.pages if p.raw_ratio is not None]
    if device_pages:
        lines.append(
            "- No raw rows shipped: the device pages sent "
            + ", ".join(
                f"{_kb(p.sent_bytes)} KB for {p.rows_read:,} rows ({p.page.label})"
                for p in device_pages
            )
            + "; the charted columns of those rows alone would be "
            + ", ".join(f"{_kb(p.raw_bytes)} KB" for p in device_pages)
            + " of JSON."
        )
    scans: dict[str, list[str]] = {}
    for p in b.pages:
        for scan in p.scans:
            scans.setdefault(scan, []).append(p.page.path)
    big = [s for s in scans if _table_of(s) in TELEMETRY]
    lines += ["", "Full scans (a whole table, or a whole index):"]
    if not scans:
        lines.append("- none")
    for scan, where in scans.items():
        table = _table_of(scan)
        lines.append(
            f"- `{scan}` ({b.rows_of(table):,} rows) in "
            + ", ".join(f"`{w}`" for w in where)
            + (" — a telemetry table: a finding" if scan in big else "")
        )
    lines.append("")
    return lines


__all__ = ["ConsoleFigures", "markdown", "measure", "telemetry_sql"]
