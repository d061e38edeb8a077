"""Telemetry ingest: messages a second the server stores, against a bare MQTT subscriber.

Every row of one run gets the same broker set-up, the same devices count, the same
payloads and the same publishers, one row after the other:

1. a bare paho subscriber, logged in as the server user on the server's shared
   subscription, that only counts what arrives: the ceiling for a Python subscriber here;
2. the real server (`create_app` with its MQTT bridge, under TestClient) into SQLite;
3. the same into PostgreSQL, when one answers.

Each receiver is measured twice:

- live: the publishers run while the receiver takes what arrives. The publishers, the
  broker and the receiver then share the machine's cores, so on a small machine the
  publishers' CPU lowers every receiver's rate, the bare subscriber's too;
- backlog: the receiver subscribes (a persistent session), goes away, the publishers send
  everything, and the broker delivers the backlog when the receiver returns: what the
  receiver alone can take, timed from its CONNACK. This is the server catching up after a
  restart, and its capacity when the devices are other machines, as they are in a fleet.

Each row starts its own Mosquitto on a free port, configured by `write_broker_config` (so
the dynamic-security ACLs apply), so that nothing one receiver left queued on the broker
reaches the next. Devices are enrolled through the API (`POST /api/v1/enroll`) and publish
as themselves (client id == username == device id), from a few publisher processes so that
publishing is not what limits the rate. Every message is a realistic TelemetryBatch with
one health sample, so a stored message is one row of `health_samples`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from bench.workers import get_from
from protocol.messages import HealthSample, InferenceStats, TelemetryBatch, encode_payload
from protocol.mqtt import new_client
from protocol.topics import Topics

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from devfleet.mosquitto import Mosquitto
    from fleet_server.mqtt.broker_config import BrokerCredentials
    from fleet_server.state import FleetState

DEVICES = 20
MESSAGES = 20_000  # in all, split evenly between the devices
RESEND = 1_000  # already-sent messages published again (same seq) to check the dedupe
PUBLISHERS = 2  # publisher processes, each holding DEVICES / PUBLISHERS connections
# Each row is run this often, on a fresh broker and database each time, and the median run
# reported (with every run's rate beside it): these machines are shared and noisy.
REPEATS = 3
# The target: this many messages a second into either database, none lost.
TARGET_RATE = 5_000.0
# Once the publishers are done and the receiver has nothing pending, this long without
# anything new arriving means nothing more will: the rest is lost.
SETTLE_S = 3.0
DEADLINE_S = 300.0  # per phase, whatever happens
POLL_S = 0.02
CONNECT_TIMEOUT_S = 15.0
# Messages a publisher connection keeps unacknowledged: enough not to wait on round trips.
PUBLISH_INFLIGHT = 200
BROKER_DROPPING = "Outgoing messages are being dropped for client"

POSTGRES_ENV = "EDGEFLEET_BENCH_POSTGRES_URL"
TEST_POSTGRES_ENV = "EDGEFLEET_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

LIVE = "live"
BACKLOG = "backlog"
MODES = (LIVE, BACKLOG)

BARE = "bare paho subscriber"
SQLITE = "server → SQLite"
POSTGRES = "server → PostgreSQL"

TOPICS = Topics()
# A fresh database's URL for one run (named by the run), dropped afterwards where that
# means anything.
DatabaseFor = Callable[[str], contextlib.AbstractContextManager[str]]


@dataclass(frozen=True)
class Row:
    label: str
    mode: str  # LIVE or BACKLOG
    sent: int
    stored: int  # rows in health_samples; for the bare subscriber, messages received
    seconds: float
    publish_rate: float  # messages/s the publishers got acknowledged by the broker
    broker_dropping: int  # times the broker's log says it began dropping for the receiver
    # The rest is None for the bare subscriber, which neither dedupes nor batches, and the
    # resend check is made on the live rows only.
    resent: int | None = None  # already-sent messages published again, same seq
    resent_received: int | None = None  # how many of those reached the server
    already_stored: int | None = None  # how many of those had been stored before
    duplicates_dropped: int | None = None  # the server's duplicates counter
    stored_twice: int | None = None  # health rows beyond one per distinct (device, seq)
    mean_batch: float | None = None  # messages per database transaction
    queue_full: int | None = None  # messages the bridge refused for a full queue
    run_rates: tuple[float, ...] = ()  # every run's rate, in the order they ran

    @property
    def lost(self) -> int:
        return self.sent - self.stored

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0

    @property
    def faulty(self) -> bool:
        """Lost or stored twice: such a run is reported whatever its rate."""
        return self.lost != 0 or (self.resent is not None and not self.dedupe_ok)

    @property
    def dedupe_ok(self) -> bool:
        if self.stored_twice != 0 or self.duplicates_dropped is None:
            return False
        if self.resent_received == self.resent:
            return self.duplicates_dropped == self.already_stored
        # Some resent messages never reached the server (a loss, reported as such).
        return self.duplicates_dropped <= (self.already_stored or 0)


@dataclass(frozen=True)
class IngestFigures:
    machine: str
    devices: int
    per_device: int
    payload_bytes: int
    publishers: int
    repeats: int
    rows: list[Row]
    postgres_note: str | None  # why PostgreSQL was not measured, if it was not

    def bare(self, mode: str) -> Row:
        return next(r for r in self.rows if r.label == BARE and r.mode == mode)

    def ratio(self, row: Row) -> float | None:
        bare = self.bare(row.mode).rate
        return row.rate / bare if bare > 0 else None


@dataclass(frozen=True)
class Device:
    device_id: str
    secret: str


def telemetry_payload(seq: int, now: float, device_index: int) -> bytes:
    """What an agent sends every minute: one health sample and one model's window."""
    wobble = (seq * 7 + device_index * 13) % 100
    return encode_payload(
        TelemetryBatch(
            schema_version=1,
            seq=seq,
            sent_at=now,
            dropped=0,
            health=(
                HealthSample(
                    ts=now,
                    cpu_percent=5.0 + wobble / 2,
                    memory_percent=30.0 + wobble / 10,
                    memory_rss_bytes=48_000_000 + wobble * 1024,
                    temperature_c=45.0 + wobble / 20,
                    disk_free_bytes=12_000_000_000 - wobble * 4096,
                    uptime_s=3600.0 + seq * 60,
                    agent_version="0.1.0",
                ),
            ),
            inference=(
                InferenceStats(
                    ts=now,
                    model_name="digits",
                    model_version="1.0.0",
                    window_s=60.0,
                    count=600,
                    errors=0,
                    latency_p50_ms=0.04 + wobble / 10_000,
                    latency_p95_ms=0.06 + wobble / 10_000,
                    latency_p99_ms=0.09 + wobble / 10_000,
                    mean_confidence=0.9 + wobble / 10_000,
                    class_counts=(60, 61, 59, 60, 62, 58, 60, 60, 61, 59),
                    nan_outputs=0,
                    drift_score=0.02,
                ),
            ),
            accuracy=(),
            shadow=(),
        )
    )


# --- publishers: separate processes, so that they do not share the server's GIL ---------


@dataclass(frozen=True)
class _Job:
    host: str
    port: int
    devices: tuple[tuple[int, Device], ...]  # (index in the fleet, device)
    first_seq: int
    last_seq: int


@dataclass(frozen=True)
class _Published:
    sent: int
    acked: int
    first_publish: float  # time.monotonic(), which is system-wide on Linux
    last_ack: float
    error: str | None = None


def _publisher(job: _Job, ready: Any, go: EventType, done: Any) -> None:
    """One publisher process: connect every device of the job, wait for `go`, publish each
    device's messages interleaved, and report once the broker acknowledged all of them."""
    try:
        done.put(_publish_job(job, ready, go))
    except Exception as exc:
        ready.put(False)
        done.put(_Published(0, 0, 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


def _connect_device(host: str, port: int, device: Device) -> mqtt.Client:
    connected = threading.Event()
    reasons: list[ReasonCode] = []

    def on_connect(c: Any, u: Any, f: Any, reason: ReasonCode, p: Any) -> None:
        reasons.append(reason)
        connected.set()

    client = new_client(device.device_id, device.device_id, device.secret)
    client.max_inflight_messages_set(PUBLISH_INFLIGHT)
    client.on_connect = on_connect
    client.connect(host, port, keepalive=60)
    client.loop_start()
    if not connected.wait(CONNECT_TIMEOUT_S) or reasons[0].is_failure:
        raise RuntimeError(f"device {device.device_id} could not connect: {reasons}")
    return client


def _publish_job(job: _Job, ready: Any, go: EventType) -> _Published:
    now = time.time()
    seqs = range(job.first_seq, job.last_seq + 1)
    payloads = [[telemetry_payload(s, now, i) for s in seqs] for i, _ in job.devices]
    topics = [TOPICS.telemetry(d.device_id) for _, d in job.devices]
    total = len(seqs) * len(job.devices)
    lock = threading.Lock()
    acked = [0]
    last_ack = [0.0]
    all_acked = threading.Event()

    def on_publish(c: Any, u: Any, mid: int, reason: ReasonCode, p: Any) -> None:
        with lock:
            acked[0] += 1
            last_ack[0] = time.monotonic()
            if acked[0] == total:
                all_acked.set()

    clients = [_connect_device(job.host, job.port, d) for _, d in job.devices]
    for client in clients:
        client.on_publish = on_publish
    ready.put(True)
    go.wait()
    first = time.monotonic()
    for n in range(len(seqs)):
        for client, topic, mine in zip(clients, topics, payloads, strict=True):
            info = client.publish(topic, mine[n], qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish on {topic} failed: {mqtt.error_string(info.rc)}")
    all_acked.wait(DEADLINE_S)
    for client in clients:
        client.disconnect()
        client.loop_stop()
    return _Published(total, acked[0], first, last_ack[0])


@dataclass(frozen=True)
class _PublishRun:
    sent: int
    acked: int
    first_publish: float
    last_ack: float

    @property
    def rate(self) -> float:
        span = self.last_ack - self.first_publish
        return self.acked / span if span > 0 else 0.0


class _Publishers:
    """Spawned publisher processes, connected and waiting; `go()` starts them all at once
    and collects their reports in the background."""

    def __init__(
        self, host: str, port: int, devices: Sequence[Device], seqs: range, processes: int
    ) -> None:
        ctx = mp.get_context("spawn")
        self._ready = ctx.Queue()
        self._done = ctx.Queue()
        self._go = ctx.Event()
        self._runs: list[_Published] = []
        self._error: Exception | None = None
        self._collector = threading.Thread(target=self._collect, daemon=True)
        indexed = list(enumerate(devices))
        groups = [tuple(indexed[i::processes]) for i in range(min(processes, len(indexed)))]
        self._processes = [
            ctx.Process(
                target=_publisher,
                args=(
                    _Job(host, port, group, seqs.start, seqs.stop - 1),
                    self._ready,
                    self._go,
                    self._done,
                ),
                daemon=True,
            )
            for group in groups
        ]
        for process in self._processes:
            process.start()
        try:
            for _ in self._processes:
                if not self._get(self._ready, 60.0):
                    failed: _Published = self._get(self._done, 5.0)
                    raise RuntimeError(f"a publisher failed: {failed.error}")
        except BaseException:
            self.close()
            raise

    def go(self) -> None:
        self._go.set()
        self._collector.start()

    @property
    def finished(self) -> bool:
        return self._collector.ident is not None and not self._collector.is_alive()

    def result(self) -> _PublishRun:
        self._collector.join()
        if self._error is not None:
            raise self._error
        errors = [r.error for r in self._runs if r.error]
        if errors:
            raise RuntimeError(f"publishing failed: {'; '.join(errors)}")
        return _PublishRun(
            sent=sum(r.sent for r in self._runs),
            acked=sum(r.acked for r in self._runs),
            first_publish=min(r.first_publish for r in self._runs),
            last_ack=max(r.last_ack for r in self._runs),
        )

    def close(self) -> None:
        for process in self._processes:
            process.join(5.0)
            if process.is_alive():
                process.terminate()
                process.join(5.0)

    def _collect(self) -> None:
        try:
            self._runs = [self._get(self._done, DEADLINE_S) for _ in self._processes]
        except Exception as exc:
            self._error = exc

    def _get(self, source: Any, timeout: float) -> Any:
        return get_from(source, self._processes, timeout, "publisher")


@contextlib.contextmanager
def _publishers(
    host: str, port: int, devices: Sequence[Device], seqs: range, processes: int
) -> Iterator[_Publishers]:
    publishers = _Publishers(host, port, devices, seqs, processes)
    try:
        yield publishers
    finally:
        publishers.close()


def _wait_for(
    count: Callable[[], int], expected: int, idle: Callable[[], bool]
) -> tuple[int, float]:
    """Poll until `count()` reaches `expected`, or stops moving for SETTLE_S while `idle()`
    (publishers done, nothing pending in the receiver). Returns the last count and the
    monotonic time it was first seen."""
    start = time.monotonic()
    last, seen_at = count(), start
    quiet_since: float | None = None
    while last < expected and time.monotonic() - start < DEADLINE_S:
        time.sleep(POLL_S)
        now_count = count()
        if now_count != last:
            last, seen_at, quiet_since = now_count, time.monotonic(), None
        elif not idle():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > SETTLE_S:
            break
    return last, seen_at


# --- the broker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Broker:
    process: Mosquitto
    credentials: BrokerCredentials
    config_dir: Path

    @property
    def host(self) -> str:
        return self.process.host

    @property
    def port(self) -> int:
        return self.process.port

    def dropping_notices(self) -> int:
        """How often Mosquitto logged that it began discarding messages for a client that
        fell behind (its `max_queued_messages`)."""
        from fleet_server.mqtt.broker_config import LOG_FILE

        log = self.config_dir / LOG_FILE
        return log.read_text(errors="replace").count(BROKER_DROPPING) if log.exists() else 0


@contextlib.contextmanager
def _broker(folder: Path) -> Iterator[_Broker]:
    from devfleet.local import start_broker
    from devfleet.mosquitto import find_mosquitto

    executable = find_mosquitto()
    if executable is None:
        raise RuntimeError("mosquitto is not installed (`make mosquitto` installs it)")
    config_dir = folder / "broker"
    process, credentials = start_broker(config_dir, executable)
    try:
        yield _Broker(process, credentials, config_dir)
    finally:
        process.kill()


def _enroll(client: TestClient, state: FleetState, count: int) -> list[Device]:
    from fleet_server.db import transaction
    from fleet_server.services.tokens import create_enrollment_token

    with transaction(state.sessions) as session:
        token = create_enrollment_token(
            session, tags=["bench"], uses=count, expires_in=None, actor="bench"
        )
    devices = []
    for i in range(count):
        response = client.post("/api/v1/enroll", json={"token": token, "name": f"bench-{i}"})
        if response.status_code != 201:
            raise RuntimeError(f"enrolment failed: {response.status_code} {response.text}")
        body = response.json()
        devices.append(Device(body["device_id"], body["secret"]))
    return devices


# --- row 1: the bare subscriber -----------------------------------------------------------


class _BareSubscriber:
    """Logged in as the server, subscribed as the server is; counts and acks."""

    def __init__(self, broker: _Broker, client_id: str, subscribe: bool = True) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.received = 0
        self.connected_at = self.first = self.last = 0.0  # CONNACK, first and last message
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._codes: list[ReasonCode] = []
        self._client = new_client(
            client_id, broker.credentials.username, broker.credentials.password
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        # A session that outlives the connection, as the server's does: a backlog waits in
        # it while the subscriber is away.
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 600
        self._client.connect(
            broker.host, broker.port, keepalive=60, clean_start=subscribe, properties=properties
        )
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S):
            raise RuntimeError("the bare subscriber could not connect")
        if subscribe:
            topic = TOPICS.server_subscriptions()[-1]  # telemetry, as the server subscribes
            self._client.subscribe(topic, qos=1)
            if not self._subscribed.wait(CONNECT_TIMEOUT_S) or self._codes[0].is_failure:
                raise RuntimeError(f"subscribing to {topic} was refused: {self._codes}")

    def _on_connect(self, c: Any, u: Any, f: Any, reason: ReasonCode, p: Any) -> None:
        self.connected_at = time.monotonic()
        self._connected.set()

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: list[ReasonCode], p: Any) -> None:
        self._codes = codes
        self._subscribed.set()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        if not self.received:
            self.first = now
        self.received += 1
        self.last = now

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _measure_bare(folder: Path, devices: int, seqs: range, processes: int, mode: str) -> Row:
    from fastapi.testclient import TestClient

    from fleet_server.app import create_app
    from fleet_server.mqtt.broker_admin import BrokerAdmin
    from fleet_server.settings import Settings

    with _broker(folder) as broker:
        # A server without its bridge, only to enrol the devices (which provisions them on
        # the broker): they publish under exactly the ACLs a real fleet has.
        settings = Settings(data_dir=folder / "data")
        with BrokerAdmin(broker.host, broker.port, broker.credentials).open() as admin:
            app = create_app(settings, broker=admin, start_bridge=False)
            with TestClient(app) as client:
                fleet = _enroll(client, app.state.fleet, devices)
        client_id = f"bench-bare-{uuid.uuid4().hex[:8]}"
        subscriber = _BareSubscriber(broker, client_id)
        expected = len(fleet) * len(seqs)
        try:
            if mode == BACKLOG:
                subscriber.close()
                run = _publish_all(broker, fleet, seqs, processes)
                subscriber = _BareSubscriber(broker, client_id, subscribe=False)
                _wait_for(lambda: subscriber.received, expected, lambda: True)
                start = subscriber.connected_at
            else:
                with _publishers(broker.host, broker.port, fleet, seqs, processes) as publishers:
                    publishers.go()
                    _wait_for(lambda: subscriber.received, expected, lambda: publishers.finished)
                    run = publishers.result()
                start = subscriber.first
        finally:
            subscriber.close()
        return Row(
            label=BARE,
            mode=mode,
            sent=run.sent,
            stored=subscriber.received,
            seconds=subscriber.last - start,
            publish_rate=run.rate,
            broker_dropping=broker.dropping_notices(),
        )


def _publish_all(
    broker: _Broker, fleet: Sequence[Device], seqs: range, processes: int
) -> _PublishRun:
    """Publish everything while no receiver is connected; returns once the broker has it."""
    with _publishers(broker.host, broker.port, fleet, seqs, processes) as publishers:
        publishers.go()
        run = publishers.result()
    if run.acked != run.sent:
        raise RuntimeError(f"the broker acknowledged {run.acked} of {run.sent} messages")
    return run


# --- rows 2 and 3: the server -------------------------------------------------------------


def _measure_server(
    label: str,
    database_url: str,
    folder: Path,
    devices: int,
    seqs: range,
    resend: int,
    processes: int,
) -> Row:
    from sqlalchemy import func, select

    from devfleet.in_process import connected_server
    from fleet_server.tables import SeenMessage

    with (
        _broker(folder) as broker,
        connected_server(
            folder / "data",
            database_url,
            broker.host,
            broker.port,
            broker.config_dir,
            CONNECT_TIMEOUT_S,
        ) as (client, state, bridge),
    ):
        fleet = _enroll(client, state, devices)

        def stored() -> int:
            return _health_rows(state)

        def seen(slice_: range | None = None) -> int:
            """Distinct telemetry (device, seq) keys stored, in `slice_` if given."""
            query = select(func.count()).select_from(SeenMessage)
            query = query.where(SeenMessage.stream == "telemetry")
            if slice_ is not None:
                query = query.where(
                    SeenMessage.device_id.in_([d.device_id for d in fleet]),
                    SeenMessage.seq >= slice_.start,
                    SeenMessage.seq < slice_.stop,
                )
            with state.sessions() as session:
                return session.scalar(query) or 0

        def metric(name: str, **labels: str) -> float:
            return state.metrics.registry.get_sample_value(name, labels) or 0.0

        messages = "edgefleet_mqtt_messages_total"

        def accepted() -> int:
            return int(metric(messages, kind="telemetry", result="accepted"))

        def duplicates() -> int:
            return int(metric("edgefleet_mqtt_duplicates_total", kind="all"))

        def idle(publishers: _Publishers) -> bool:
            # drain() returns at once when every queued message is written.
            return publishers.finished and bridge.drain(timeout=POLL_S)

        expected = len(fleet) * len(seqs)
        with _publishers(broker.host, broker.port, fleet, seqs, processes) as publishers:
            publishers.go()
            count, done_at = _wait_for(stored, expected, lambda: idle(publishers))
            run = publishers.result()
        batches = metric("edgefleet_ingest_batch_messages_count")
        batched = metric("edgefleet_ingest_batch_messages_sum")
        dropping = broker.dropping_notices()

        # A device resends what it saw no PUBACK for, and the broker redelivers what it
        # saw no PUBACK for: the same seq again must be dropped, not stored twice.
        per_device = max(1, min(len(seqs), resend // max(1, len(fleet))))
        again = range(seqs.start, seqs.start + per_device)
        before_dup, before_accepted = duplicates(), accepted()
        already = seen(again)  # all of the slice, unless some of it was lost above
        with _publishers(broker.host, broker.port, fleet, again, processes) as publishers:
            publishers.go()
            resent = publishers.result().acked
            _wait_for(lambda: accepted() - before_accepted, resent, lambda: idle(publishers))
        bridge.drain()
        received = accepted() - before_accepted
        return Row(
            label=label,
            mode=LIVE,
            sent=run.sent,
            stored=count,
            seconds=done_at - run.first_publish,
            publish_rate=run.rate,
            broker_dropping=dropping,
            resent=resent,
            resent_received=received,
            already_stored=already,
            duplicates_dropped=duplicates() - before_dup,
            # One health row per distinct (device, seq), whatever was resent.
            stored_twice=stored() - seen(),
            mean_batch=batched / batches if batches else None,
            queue_full=int(metric(messages, kind="all", result="queue_full")),
        )


def _health_rows(state: FleetState) -> int:
    from sqlalchemy import func, select

    from fleet_server.tables import HealthRow

    with state.sessions() as session:
        return session.scalar(select(func.count()).select_from(HealthRow)) or 0


def _measure_server_backlog(
    label: str, database_url: str, folder: Path, devices: int, seqs: range, processes: int
) -> Row:
    from devfleet.in_process import connected_server

    with _broker(folder) as broker:
        server = (
            folder / "data",
            database_url,
            broker.host,
            broker.port,
            broker.config_dir,
            CONNECT_TIMEOUT_S,
        )
        # The first start subscribes; the broker keeps the session, and queues for it, once
        # the server has stopped. The second start, with the same client id, catches up.
        with connected_server(*server) as (client, state, _):
            fleet = _enroll(client, state, devices)
        run = _publish_all(broker, fleet, seqs, processes)
        with connected_server(*server) as (client, state, bridge):
            assert bridge.connected_at is not None
            count, done_at = _wait_for(
                lambda: _health_rows(state),
                len(fleet) * len(seqs),
                lambda: bridge.drain(timeout=POLL_S),
            )
            metric = state.metrics.registry.get_sample_value
            batches = metric("edgefleet_ingest_batch_messages_count") or 0.0
            batched = metric("edgefleet_ingest_batch_messages_sum") or 0.0
            queue_full = metric(
                "edgefleet_mqtt_messages_total", {"kind": "all", "result": "queue_full"}
            )
            return Row(
                label=label,
                mode=BACKLOG,
                sent=run.sent,
                stored=count,
                seconds=done_at - bridge.connected_at,
                publish_rate=run.rate,
                broker_dropping=broker.dropping_notices(),
                mean_batch=batched / batches if batches else None,
                queue_full=int(queue_full or 0),
            )


class PostgresUnavailable(Exception):
    pass


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the PostgreSQL server, dropped afterwards."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from devfleet.databases import create_database, drop_database

    raw = os.environ.get(POSTGRES_ENV) or os.environ.get(TEST_POSTGRES_ENV) or DEFAULT_POSTGRES_URL
    try:
        url = create_database(raw, "edgefleet_bench", connect_timeout=5)
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        where = make_url(raw).render_as_string(hide_password=True)
        reason = first[0] if first else type(exc).__name__
        raise PostgresUnavailable(f"{where}: {reason}") from None
    try:
        yield url
    finally:
        drop_database(url)


def representative(runs: Sequence[Row]) -> Row:
    """The run a row reports: the worst faulty one if any (a loss is never averaged
    away), else the median by rate; with every run's rate attached."""
    faulty = [r for r in runs if r.faulty]
    if faulty:
        chosen = max(faulty, key=lambda r: (r.lost, r.stored_twice or 0))
    else:
        chosen = sorted(runs, key=lambda r: r.rate)[(len(runs) - 1) // 2]
    return dataclasses.replace(chosen, run_rates=tuple(r.rate for r in runs))


def measure(
    *,
    devices: int = DEVICES,
    messages: int = MESSAGES,
    resend: int = RESEND,
    publishers: int = PUBLISHERS,
    postgres: bool = True,
    repeats: int = REPEATS,
    progress: Callable[[str], None] = lambda _: None,
) -> IngestFigures:
    from toolchain.convert import machine_description

    per_device = max(1, messages // devices)
    seqs = range(1, per_device + 1)
    rows: list[Row] = []
    note: str | None = None
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)

        def server_run(label: str, database: DatabaseFor, mode: str, run: int) -> Row:
            folder = root / f"{label}-{mode}-{run}"
            with database(f"{mode}-{run}") as url:
                if mode == LIVE:
                    return _measure_server(label, url, folder, devices, seqs, resend, publishers)
                return _measure_server_backlog(label, url, folder, devices, seqs, publishers)

        def server_rows(label: str, database: DatabaseFor) -> None:
            """Each run on a database of its own."""
            for mode in MODES:
                progress(f"{label}, {mode}, {repeats} run(s)")
                runs = [server_run(label, database, mode, n) for n in range(repeats)]
                rows.append(representative(runs))

        for mode in MODES:
            progress(f"{BARE}, {mode}: {devices} devices x {per_device} messages")
            runs = [
                _measure_bare(root / f"bare-{mode}-{n}", devices, seqs, publishers, mode)
                for n in range(repeats)
            ]
            rows.append(representative(runs))

        @contextlib.contextmanager
        def sqlite_database(name: str) -> Iterator[str]:
            yield f"sqlite:///{root / f'fleet-{name}.db'}"

        server_rows(SQLITE, sqlite_database)
        if not postgres:
            note = "not asked for"
        else:
            try:
                server_rows(POSTGRES, lambda _name: postgres_database())
            except PostgresUnavailable as exc:
                note = f"not available ({exc})"
                progress(f"PostgreSQL {note}")
    return IngestFigures(
        machine=machine_description(),
        devices=devices,
        per_device=per_device,
        payload_bytes=len(telemetry_payload(per_device, time.time(), 0)),
        publishers=min(publishers, devices),
        repeats=repeats,
        rows=rows,
        postgres_note=note,
    )


# --- BENCHMARKS.md ------------------------------------------------------------------------


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown(figures: IngestFigures) -> list[str]:
    sent = figures.devices * figures.per_device
    resent = next((r.resent for r in figures.rows if r.resent is not None), 0)
    lines = [
        "## Telemetry ingest: server vs a bare MQTT subscriber",
        "",
        f"{figures.devices} devices enrolled through the API each publish "
        f"{figures.per_device} TelemetryBatch messages at QoS 1 ({figures.payload_bytes} "
        f"bytes: one health sample and one inference window, distinct `seq`), {sent} in all, "
        f"as fast as {figures.publishers} publisher processes can. Each row has a Mosquitto "
        "of its own, configured by `broker-config` (dynamic-security ACLs, and queue and "
        "in-flight limits raised so a subscriber that falls behind is not dropped). "
        "The bare subscriber is plain paho logged in as the server on "
        "the server's subscription, only counting. Each receiver is measured twice:",
        "",
        "- **live**: the publishers run while the receiver takes what arrives; publishers, "
        "broker and receiver share the machine's cores. Rate = received / (first → last "
        "arrival) for the bare subscriber, rows in `health_samples` / (first publish → last "
        f"row committed, polled every {POLL_S * 1000:.0f} ms) for the server.",
        "- **backlog**: the receiver subscribes with a persistent session and goes away, the "
        "publishers send everything, the receiver comes back (the server: a restart, same "
        "client id) and takes the backlog alone. Rate = messages / (CONNACK → last arrival, "
        "or last row committed). This is what the receiver itself can take, as when the "
        "devices are other machines.",
        "",
        f"Each row is the median of {figures.repeats} run(s) by rate, each on a fresh "
        "broker and database (a run that lost or doubled anything is reported instead). "
        f"lost = sent − stored. After each live run the first {resent // max(1, figures.devices)} "
        f"messages of every device ({resent}) are published again with the same `seq`: the "
        "server must drop every one it had stored.",
        "",
        "| receiver | mode | sent | stored / received | lost | seconds | messages/s "
        "| every run, messages/s | vs bare subscriber (same mode) | publish rate "
        "| messages per transaction | resent (of them stored before) | duplicates dropped "
        "| stored twice |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for row in figures.rows:
        resent_cell = "-" if row.resent is None else f"{row.resent} ({row.already_stored})"
        lines.append(
            f"| {row.label} | {row.mode} | {row.sent} | {row.stored} | {row.lost} "
            f"| {row.seconds:.2f} | {row.rate:,.0f} "
            f"| {' / '.join(f'{r:,.0f}' for r in row.run_rates) or '-'} "
            f"| {_fmt(figures.ratio(row), '{:.2f}')} "
            f"| {row.publish_rate:,.0f}/s | {_fmt(row.mean_batch, '{:.1f}')} | {resent_cell} "
            f"| {_fmt(row.duplicates_dropped, '{}')} | {_fmt(row.stored_twice, '{}')} |"
        )
    lines += [
        "",
        f"Targets (at least {TARGET_RATE:,.0f} messages/s into either database with none "
        "lost; resent messages stored once):",
    ]
    met: dict[str, bool] = {}
    for label in (SQLITE, POSTGRES):
        found = [r for r in figures.rows if r.label == label]
        if not found:
            lines.append(f"- {label}: PostgreSQL was {figures.postgres_note} — not measured")
        for row in found:
            ok = row.rate >= TARGET_RATE and row.lost == 0
            met[row.mode] = met.get(row.mode, False) or ok
            lines.append(
                f"- {label}, {row.mode}: {row.rate:,.0f} messages/s, {row.lost} of {row.sent} "
                f"lost — {'met' if ok else 'MISSED'}"
            )
    for mode in MODES:
        bare = figures.bare(mode)
        lines.append(
            f"- {TARGET_RATE:,.0f} messages/s with none lost into either database, {mode}: "
            f"{'met' if met.get(mode) else 'MISSED'} (the bare subscriber, {mode}: "
            f"{bare.rate:,.0f} messages/s, {bare.lost} lost)"
        )
    for row in figures.rows:
        if row.resent is not None:
            lines.append(
                f"- {row.label}, resent messages: {row.duplicates_dropped} dropped of the "
                f"{row.already_stored} stored before, {row.stored_twice} stored twice — "
                f"{'met' if row.dedupe_ok else 'MISSED'}"
            )
    notes = []
    if not met.get(LIVE) and figures.bare(LIVE).rate < TARGET_RATE * 1.5:
        notes.append(
            f"- Live, the bare subscriber itself takes only {figures.bare(LIVE).rate:,.0f} "
            "messages/s: the publishers use the same cores as the broker and the receiver, "
            "so the live rows measure this machine as much as the receiver."
        )
    dropping = [
        f"{r.label}, {r.mode} ({r.broker_dropping}×)" for r in figures.rows if r.broker_dropping
    ]
    if dropping:
        notes.append(
            f"- Mosquitto's log says it began discarding messages (`{BROKER_DROPPING} …`) "
            f"for: {', '.join(dropping)}. A QoS 1 subscriber that falls behind gets "
            "Mosquitto's default `max_queued_messages` (1000) queued and no more, although "
            "the publishers already had their PUBACKs: those messages are gone for good."
        )
    notes += [
        f"- {row.label}: only {row.resent_received} of the {row.resent} resent messages "
        "reached the server."
        for row in figures.rows
        if row.resent is not None and row.resent_received != row.resent
    ]
    notes += [
        f"- {row.label}, {row.mode}: the bridge refused {row.queue_full} messages for a full "
        "ingest queue (left unacknowledged, for the broker to redeliver)."
        for row in figures.rows
        if row.queue_full
    ]
    lines += ["", f"Measured on {figures.machine}.", *notes, ""]
    return lines


__all__ = ["IngestFigures", "Row", "markdown", "measure", "telemetry_payload"]
