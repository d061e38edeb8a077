"""What one telemetry message costs the server's CPU, without a broker or publishers.

The broker benchmark (bench/ingest.py) runs the broker, the publishers and the server on
the same two cores; this isolates the ingest process's work per message: decoding and
checking a payload against the wire contract, and writing it.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fleet_server.app import build_state
from fleet_server.db import transaction
from fleet_server.mqtt.bridge import BATCH_MAX
from fleet_server.mqtt.ingest import Received, write_batch
from fleet_server.settings import Settings
from fleet_server.tables import Device
from protocol.messages import TelemetryBatch, decode_payload

MESSAGES = 10_000
DEVICES = 20


@dataclass(frozen=True)
class PipelineRow:
    database: str
    decode_us: float
    write_us: float

    @property
    def ceiling(self) -> float:
        """Messages per second one core could take, decode and write together."""
        return 1e6 / (self.decode_us + self.write_us)


def measure_database(label: str, database_url: str | None, payloads: list[bytes]) -> PipelineRow:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        settings = Settings(data_dir=Path(tmp), database_url=database_url)
        state = build_state(settings, with_mqtt=False)
        with transaction(state.sessions) as session:
            for i in range(DEVICES):
                session.add(Device(id=f"dev-{i}", name=f"dev-{i}", secret_hash="-"))
        started = time.perf_counter()
        messages = [decode_payload(TelemetryBatch, raw) for raw in payloads]
        decode_s = time.perf_counter() - started
        now = dt.datetime.now(dt.UTC)
        items = [Received(f"dev-{i % DEVICES}", m, now) for i, m in enumerate(messages)]
        started = time.perf_counter()
        for start in range(0, len(items), BATCH_MAX):
            with transaction(state.sessions) as session:
                write_batch(session, items[start : start + BATCH_MAX])
        write_s = time.perf_counter() - started
        state.engine.dispose()
    count = len(payloads)
    return PipelineRow(label, decode_s / count * 1e6, write_s / count * 1e6)


def measure() -> list[PipelineRow]:
    from bench.ingest import PostgresUnavailable, postgres_database, telemetry_payload

    now = time.time()
    payloads = [telemetry_payload(seq + 1, now, seq % DEVICES) for seq in range(MESSAGES)]
    rows = [measure_database("SQLite", None, payloads)]
    try:
        with postgres_database() as url:
            rows.append(measure_database("PostgreSQL", url, payloads))
    except PostgresUnavailable:
        pass  # the ingest section says why PostgreSQL was not measured
    return rows


def markdown(rows: list[PipelineRow]) -> list[str]:
    lines = [
        "## Ingest process: CPU per telemetry message, no broker",
        "",
        f"{MESSAGES} telemetry messages decoded and checked against the wire contract "
        f"(`decode_payload`), then written in batches of {BATCH_MAX} (`write_batch`), in one "
        "process with nothing else running: the work of the server's ingest process. The "
        "ceiling is what it takes on a core of its own; receiving and acknowledging run in "
        "the server process on another (the bare subscriber's backlog rate above bounds "
        "that half).",
        "",
        "| database | decode µs/message | write µs/message | ceiling messages/s (one core) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.database} | {row.decode_us:.0f} | {row.write_us:.0f} | {row.ceiling:,.0f} |"
        )
    lines.append("")
    return lines
