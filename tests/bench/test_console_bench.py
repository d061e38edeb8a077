"""The console benchmark's machinery on a handful of devices and an hour of telemetry: every
page answers, the seeded rows are where the pages look for them, and the section reports
them. Nothing here judges speed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest

from bench import console
from fleet_server.app import build_state
from fleet_server.db import make_engine
from fleet_server.settings import Settings
from fleet_server.tables import HealthRow, utcnow

DEVICES = 5
FULL = 2
HISTORY_S = 3600
RECENT_S = 1800


@pytest.fixture(scope="module")
def figures() -> console.ConsoleFigures:
    return console.measure(
        devices=DEVICES,
        full_devices=FULL,
        history_s=HISTORY_S,
        recent_s=RECENT_S,
        requests=2,
        postgres=False,
    )


def test_every_page_answers_from_the_seeded_fleet(figures: console.ConsoleFigures) -> None:
    [sqlite] = figures.backends
    assert sqlite.label == console.SQLITE
    assert figures.postgres_note == "not asked for"
    steps, recent = HISTORY_S // 10, RECENT_S // 10
    for _table, rows in sqlite.rows:
        # Topped up to the present while the pages were measured: a few steps more.
        assert FULL * steps + (DEVICES - FULL) * recent <= rows < DEVICES * steps + 100
    assert sqlite.db_bytes > 0
    paths = [p.page.path for p in sqlite.pages]
    assert paths == [
        "/",
        "/devices",
        f"/devices?tag={console.TAG}&page=3",
        "/devices/dev-0000?range=1h",
        "/devices/dev-0000?range=24h",
        "/devices/dev-0000?range=7d",
        "/models",
        "/rollouts",
    ]
    for page in sqlite.pages:
        assert page.status == 200, page.page.path
        assert page.sent_bytes > 0
        assert len(page.times_s) == 2
        assert 0 < page.median_s <= page.max_s
        assert page.statements > 0
        assert page.cold
        assert page.first_read_bytes is not None
        assert page.plans
    by_path = {p.page.path: p for p in sqlite.pages}
    week = by_path["/devices/dev-0000?range=7d"]
    # dev-0000 has the whole hour in each of three tables; charts carry the lot.
    assert week.rows_read >= 3 * steps
    assert week.raw_values is not None
    assert week.raw_values >= steps * sum(len(c) for c in console.CHARTED.values())
    assert week.raw_bytes is not None
    assert week.raw_bytes > 0
    assert by_path["/"].rows_read >= figures.online * console.HEALTH_S // 10
    assert by_path["/devices"].rows_read == 0
    assert by_path["/devices"].raw_bytes is None
    # The device page reads its telemetry from the (device_id, ts) indexes alone.
    for table in console.TELEMETRY:
        covered = f"SEARCH {table} USING COVERING INDEX ix_{table}_device_ts"
        assert any(covered in p for p in week.plans)
    # Scans of these tiny tables are listed, with their rows, and none is of telemetry.
    assert not {console._table_of(s) for s in week.scans} & set(console.TELEMETRY)


def test_markdown_reports_every_page_and_the_targets(figures: console.ConsoleFigures) -> None:
    lines = console.markdown(figures)
    assert lines[0] == "## Web console at fleet scale"
    for page in figures.backends[0].pages:
        assert any(line.startswith(f"| `{page.page.path}` | 200 |") for line in lines)
        assert any(line.startswith(f"- `{page.page.path}`: median ") for line in lines)
    assert "### SQLite" in lines
    assert "Not measured: PostgreSQL was not asked for." in lines
    assert any("— met (first (cold) " in line for line in lines)

    # A slow page is reported as such, and a scan of a telemetry table as a finding.
    [sqlite] = figures.backends
    slow = dataclasses.replace(sqlite.pages[0], times_s=(0.2, 1.5), scans=("SCAN health_samples",))
    changed = dataclasses.replace(sqlite, pages=(slow, *sqlite.pages[1:]))
    lines = console.markdown(dataclasses.replace(figures, backends=(changed,)))
    [missed] = [line for line in lines if line.startswith("- `/`: ")]
    assert "— MISSED; its slowest statement took" in missed
    assert any(
        line.startswith("- `SCAN health_samples`") and line.endswith("a finding") for line in lines
    )


def test_seeded_timestamps_are_what_sqlalchemy_stores() -> None:
    """The console buckets and filters `ts` as SQLAlchemy stores it: rows written by the
    seeder's SQL must read back through the ORM like rows the server wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        state = build_state(Settings(data_dir=Path(tmp), rollout_interval_s=0))
        with state.sessions() as session, session.begin():
            session.add(
                HealthRow(
                    device_id="orm",
                    ts=dt.datetime(2026, 1, 2, 3, 4, 5, 600_007, tzinfo=dt.UTC),
                    cpu_percent=1.0,
                    memory_percent=1.0,
                    memory_rss_bytes=1,
                    temperature_c=None,
                    disk_free_bytes=1,
                    uptime_s=1.0,
                    agent_version="x",
                )
            )
        scale = console.Scale(3, 1, 60, 30, 10)
        start = int(utcnow().timestamp()) - 50
        seeder = console.Seeder(make_engine(state.settings.resolved_database_url()), scale, start)
        try:
            seeder.prepare()
            seeder.history(lambda _: None)
        finally:
            seeder.close()
        state.engine.dispose()
        raw = sqlite3.connect(Path(tmp) / "fleet.db")
        stamps = [ts for (ts,) in raw.execute("SELECT ts FROM health_samples ORDER BY id")]
        counts = raw.execute("SELECT class_counts, count FROM inference_windows").fetchall()
        raw.close()
    assert stamps[0] == "2026-01-02 03:04:05.600007"
    first = dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert stamps[1] == f"{first}.000000"  # dev-0000 at step 0
    assert all(len(s) == 26 for s in stamps)
    # 6 steps for the full device, the last 3 for the others, in time order.
    assert len(stamps) == 1 + 6 + 2 * 3
    assert stamps[1:] == sorted(stamps[1:])
    for class_counts, count in counts:
        assert sum(json.loads(class_counts)) == count


@pytest.mark.skipif(
    not os.environ.get("EDGEFLEET_TEST_POSTGRES_URL"),
    reason="EDGEFLEET_TEST_POSTGRES_URL names no PostgreSQL server",
)
def test_the_benchmark_runs_on_postgresql_too() -> None:
    figures = console.measure(
        devices=3, full_devices=1, history_s=600, recent_s=300, requests=1, postgres=True
    )
    assert [b.label for b in figures.backends] == [console.SQLITE, console.POSTGRES]
    postgres = figures.backends[1]
    assert all(p.status == 200 for p in postgres.pages)
    assert all(rows >= 60 + 2 * 30 for _, rows in postgres.rows)
    assert "### PostgreSQL" in console.markdown(figures)


def test_only_telemetry_tables_are_seeded() -> None:
    with pytest.raises(ValueError, match="no telemetry table"):
        console.telemetry_sql("devices", "sqlite")


def test_a_plan_line_names_its_table() -> None:
    assert console._table_of("SCAN devices USING INDEX ix_devices_status") == "devices"
    assert console._table_of("SEARCH health_samples USING INDEX ix (ts>?)") == "health_samples"
    assert console._table_of("Seq Scan on inference_windows") == "inference_windows"
    assert console._table_of("USE TEMP B-TREE FOR GROUP BY") == ""
