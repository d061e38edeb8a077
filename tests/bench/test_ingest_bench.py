"""The ingest benchmark's machinery, at a size where nothing can fall behind: it must count
every message sent, stored and resent exactly. Nothing here looks at how fast anything is."""

from __future__ import annotations

import dataclasses

import pytest

from bench import ingest
from devfleet.mosquitto import find_mosquitto

DEVICES = 3
PER_DEVICE = 100
RESEND = 30


@pytest.fixture(scope="module")
def figures() -> ingest.IngestFigures:
    if find_mosquitto() is None:
        pytest.fail(
            "the mosquitto broker is not installed; `make test` installs it "
            "(apt-get install mosquitto mosquitto-clients)",
            pytrace=False,
        )
    return ingest.measure(
        devices=DEVICES,
        messages=DEVICES * PER_DEVICE,
        resend=RESEND,
        publishers=2,
        postgres=False,
        repeats=2,
    )


def _row(figures: ingest.IngestFigures, label: str, mode: str = ingest.LIVE) -> ingest.Row:
    return next(r for r in figures.rows if r.label == label and r.mode == mode)


def test_every_message_is_counted_once_live_and_from_a_backlog(
    figures: ingest.IngestFigures,
) -> None:
    assert [(r.label, r.mode) for r in figures.rows] == [
        (ingest.BARE, ingest.LIVE),
        (ingest.BARE, ingest.BACKLOG),
        (ingest.SQLITE, ingest.LIVE),
        (ingest.SQLITE, ingest.BACKLOG),
    ]
    assert (figures.devices, figures.per_device, figures.publishers) == (DEVICES, PER_DEVICE, 2)
    assert figures.repeats == 2
    for row in figures.rows:
        assert len(row.run_rates) == 2
        assert row.rate in row.run_rates
        assert (row.sent, row.stored, row.lost) == (DEVICES * PER_DEVICE,) * 2 + (0,)
        assert row.broker_dropping == 0
        assert row.seconds > 0
    assert figures.postgres_note == "not asked for"


def test_the_backlog_reaches_the_restarted_server(figures: ingest.IngestFigures) -> None:
    # Everything was published while the server was stopped: all of it came from the
    # broker's queue for the server's persistent session, in batches.
    row = _row(figures, ingest.SQLITE, ingest.BACKLOG)
    assert row.stored == DEVICES * PER_DEVICE
    assert row.mean_batch is not None
    assert row.mean_batch >= 1
    assert row.resent is None
    assert row.queue_full == 0


def test_resent_messages_are_dropped_not_stored(figures: ingest.IngestFigures) -> None:
    row = _row(figures, ingest.SQLITE)
    assert row.resent == row.resent_received == RESEND
    assert row.already_stored == RESEND
    assert row.duplicates_dropped == RESEND
    assert row.stored_twice == 0
    assert row.dedupe_ok
    assert row.queue_full == 0


def test_markdown_reports_the_counts(figures: ingest.IngestFigures) -> None:
    lines = ingest.markdown(figures)
    assert lines[0] == "## Telemetry ingest: server vs a bare MQTT subscriber"
    sent = DEVICES * PER_DEVICE
    for mode in ingest.MODES:
        bare = f"| {ingest.BARE} | {mode} | {sent} | {sent} | 0 |"
        assert any(line.startswith(bare) for line in lines)
    sqlite = next(line for line in lines if line.startswith(f"| {ingest.SQLITE} | live |"))
    assert sqlite.startswith(f"| {ingest.SQLITE} | live | {sent} | {sent} | 0 |")
    assert sqlite.endswith(f"| {RESEND} ({RESEND}) | {RESEND} | 0 |")
    backlog = next(line for line in lines if line.startswith(f"| {ingest.SQLITE} | backlog |"))
    assert backlog.endswith("| - | - | - |")
    assert f"- {ingest.POSTGRES}: PostgreSQL was not asked for — not measured" in lines
    assert any(
        line.startswith(f"- {ingest.SQLITE}, resent messages:") and line.endswith("— met")
        for line in lines
    )


def test_markdown_says_missed_for_losses_and_duplicates(figures: ingest.IngestFigures) -> None:
    row = _row(figures, ingest.SQLITE)
    bad = dataclasses.replace(row, stored=row.sent - 5, stored_twice=2, broker_dropping=1)
    bare = [figures.bare(mode) for mode in ingest.MODES]
    lines = ingest.markdown(dataclasses.replace(figures, rows=[*bare, bad]))
    target = next(line for line in lines if line.startswith(f"- {ingest.SQLITE}, live: "))
    assert target.endswith("5 of 300 lost — MISSED")
    dedupe = next(line for line in lines if line.startswith(f"- {ingest.SQLITE}, resent"))
    assert dedupe.endswith("2 stored twice — MISSED")
    assert any("began discarding messages" in line for line in lines)


def test_a_row_reports_the_median_run_unless_one_lost_something(
    figures: ingest.IngestFigures,
) -> None:
    row = _row(figures, ingest.SQLITE)
    slow, mid, fast = (dataclasses.replace(row, seconds=s) for s in (3.0, 2.0, 1.0))
    chosen = ingest.representative([fast, slow, mid])
    assert chosen.seconds == 2.0
    assert chosen.run_rates == (fast.rate, slow.rate, mid.rate)
    lossy = dataclasses.replace(fast, stored=row.sent - 1)
    doubled = dataclasses.replace(mid, stored_twice=1)
    assert ingest.representative([slow, lossy, doubled]).lost == 1
    assert ingest.representative([slow, doubled]).stored_twice == 1
