"""The server's MQTT connection: desired states out, availability, reports and telemetry in.

paho's network thread only checks topics and sizes and queues; one writer thread gathers
the queue into batches for the ingest process (`ingest_process.py`), which decodes and
stores them, and acknowledges each message once its batch is committed.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.metrics.server import ServerMetrics
from fleet_server.mqtt.broker_config import BrokerCredentials
from fleet_server.mqtt.ingest import prune
from fleet_server.mqtt.ingest_process import (
    IngestProcess,
    IngestUnavailable,
    Outcome,
    RawMessage,
)
from fleet_server.settings import Settings
from fleet_server.tables import DesiredState, utcnow
from protocol.messages import MAX_PAYLOAD_BYTES
from protocol.mqtt import new_client
from protocol.topics import SHARE_GROUP, SPEC, TopicKind, Topics

log = logging.getLogger("fleet_server.mqtt")

BATCH_MAX = 2000
BATCH_WINDOW_S = 0.05
QUEUE_MAX = 100_000
PRUNE_EVERY_S = 3600.0
# Batches with the ingest process at once: one being written, the next waiting.
PIPELINE_DEPTH = 2
# How long the broker keeps the server's session (and queues for it) while it is away.
SESSION_EXPIRY_S = 7 * 24 * 3600


def _session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    # Acks wait for the batch's commit, so what the broker lets us hold unacknowledged
    # bounds the batches: room for several keeps the queue filling while one is written
    # (the broker's max_inflight_messages must allow as many).
    properties.ReceiveMaximum = 4 * BATCH_MAX
    return properties


class MqttBridge:
    """The server's MQTT client; it is the `DesiredPublisher` of a server with a broker."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        topics: Topics,
        metrics: ServerMetrics,
        host: str,
        port: int,
        credentials: BrokerCredentials,
        client_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.topics = topics
        self.metrics = metrics
        self.host, self.port = host, port
        self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=QUEUE_MAX)
        self._ingest = IngestProcess(settings.resolved_database_url())
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._logged: set[tuple[str, str]] = set()
        self.connected_at: float | None = None  # time.monotonic() of the last CONNACK
        # A stable id and a persistent session: what arrives while the server is down is
        # queued by the broker and delivered when it is back. Acks go out only once a
        # message is in the database (manual_ack), so a crash loses nothing either.
        self._client = new_client(
            client_id or f"fleet-server-{socket.gethostname()}-{settings.port}",
            credentials.username,
            credentials.password,
            manual_ack=True,
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._writer: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            raise RuntimeError("the MQTT bridge is still running (or still stopping)")
        self._stop.clear()
        self._ingest.start()
        self._writer = threading.Thread(target=self._write_loop, name="mqtt-writer", daemon=True)
        self._writer.start()
        self._client.connect_async(
            self.host,
            self.port,
            keepalive=30,
            clean_start=False,
            properties=_session_properties(),
        )
        self._client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout)
        self._ingest.stop(timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def ingest_pid(self) -> int | None:
        """The ingest process's pid (it is restarted if it dies)."""
        return self._ingest.pid

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message is written (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    # -- desired states -------------------------------------------------------------------

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        spec = SPEC[TopicKind.DESIRED]
        self._client.publish(
            self.topics.desired(device_id), payload, qos=spec.qos, retain=spec.retained
        )

    def forget_device(self, device_id: str) -> None:
        """Clear the decommissioned device's retained messages. A kick sends no last will,
        so without this its availability would read "online" for ever."""
        for topic in (
            self.topics.desired(device_id),
            self.topics.availability(device_id),
        ):
            # An empty retained payload removes the retained message from the broker.
            self._client.publish(topic, b"", qos=1, retain=True)

    def _republish_desired(self) -> None:
        """After a (re)connect: the database is the truth, even if the broker lost state."""
        with self.sessions() as session:
            rows = session.execute(select(DesiredState.device_id, DesiredState.payload_json))
            for device_id, payload in rows:
                self.publish_desired(device_id, payload.encode("utf-8"))

    # -- paho callbacks (network thread: no database work here) --------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("MQTT connection refused: %s", reason)
            return
        group = SHARE_GROUP if self.settings.mqtt_shared else None
        client.subscribe([(t, 1) for t in self.topics.server_subscriptions(group)])
        self.connected_at = time.monotonic()
        self._connected.set()
        threading.Thread(target=self._republish_desired, daemon=True).start()
        log.info("MQTT bridge connected to %s:%d", self.host, self.port)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("MQTT bridge disconnected (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        raw = self._check(msg)
        if raw is None:
            client.ack(msg.mid, msg.qos)  # refused for good: redelivering it changes nothing
            return
        try:
            self._queue.put_nowait(_Pending(raw, msg.mid, msg.qos))
        except queue.Full:
            # Not acked: the broker keeps it and redelivers once we catch up.
            self.metrics.mqtt_messages.labels("all", "queue_full").inc()

    def _check(self, msg: mqtt.MQTTMessage) -> RawMessage | None:
        """What can be refused without parsing; the payload is checked by the ingest process."""
        metrics = self.metrics
        try:
            device_id, kind = self.topics.parse(msg.topic)
        except ValueError as exc:
            metrics.mqtt_invalid.labels("unknown", "topic").inc()
            self._log_once("?", "topic", f"ignored a message on {msg.topic!r}: {exc}")
            return None
        if kind is TopicKind.DESIRED or (not msg.payload and kind is TopicKind.AVAILABILITY):
            return None  # our own desired states, or a cleared retained message
        if len(msg.payload) > MAX_PAYLOAD_BYTES:
            metrics.mqtt_invalid.labels(kind.value, "oversized").inc()
            self._log_once(device_id, "oversized", f"{len(msg.payload)} bytes on {msg.topic}")
            return None
        return RawMessage(device_id, kind, bytes(msg.payload), time.time())

    def _log_once(self, device_id: str, reason: str, text: str) -> None:
        """One line per device and reason: a chatty broken device must not flood the log."""
        if (device_id, reason) not in self._logged:
            self._logged.add((device_id, reason))
            log.warning("invalid MQTT payload from %s: %s", device_id, text)

    # -- the writer thread ----------------------------------------------------------------

    def _next_batch(self, wait: bool) -> list[_Pending]:
        try:
            first = self._queue.get(timeout=0.2) if wait else self._queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + BATCH_WINDOW_S
        while len(batch) < BATCH_MAX:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=max(remaining, 0))
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _write_loop(self) -> None:
        last_prune = 0.0
        # Batches handed to the ingest process, oldest first, not yet acknowledged.
        inflight: deque[list[_Pending]] = deque()
        while not (self._stop.is_set() and self._queue.empty() and not inflight):
            batch = self._next_batch(wait=not inflight)
            self.metrics.ingest_queue.set(self._queue.qsize())
            if batch:
                self._ingest.submit([p.raw for p in batch])
                inflight.append(batch)
            # Collect at once what is ready; wait only when the pipeline is full or there
            # is nothing else to do.
            while inflight and (
                len(inflight) >= PIPELINE_DEPTH or not batch or self._ingest.ready()
            ):
                outcome = self._collect()
                if outcome is None:
                    return  # stopping: unacked, so the broker redelivers to the next server
                self._finish(inflight.popleft(), outcome)
            if time.monotonic() - last_prune > PRUNE_EVERY_S:
                last_prune = time.monotonic()
                self._prune()

    def _collect(self) -> Outcome | None:
        """The oldest batch's outcome, retried while the ingest process cannot be
        restarted; None once the bridge stops. Nothing is acked meanwhile, so the broker
        holds the rest of the stream."""
        delay = 1.0
        while True:
            try:
                return self._ingest.collect()
            except IngestUnavailable:
                log.exception("the ingest process is unavailable; retrying in %g s", delay)
                if self._stop.wait(delay):
                    return None
                delay = min(delay * 2, 30.0)

    def _finish(self, batch: list[_Pending], outcome: Outcome) -> None:
        self._account(outcome, len(batch))
        for item in batch:
            self._client.ack(item.mid, item.qos)
            self._queue.task_done()

    def _account(self, outcome: Outcome, size: int) -> None:
        metrics = self.metrics
        for kind, count in outcome.accepted.items():
            metrics.mqtt_messages.labels(kind.value, "accepted").inc(count)
        for refused in outcome.refused:
            metrics.mqtt_invalid.labels(refused.kind.value, "schema").inc()
            self._log_once(refused.device_id, f"schema:{refused.kind}", refused.reason)
        metrics.ingest_batch.observe(size)
        metrics.mqtt_duplicates.labels("all").inc(outcome.duplicates)
        if outcome.unknown_device:
            metrics.mqtt_invalid.labels("all", "unknown_device").inc(outcome.unknown_device)
        if outcome.write_failed:
            metrics.mqtt_messages.labels("all", "write_failed").inc(outcome.write_failed)

    def _prune(self) -> None:
        days = self.settings.telemetry_retention_days
        cutoff = utcnow() - dt.timedelta(days=days)
        try:
            with self.sessions() as session, session.begin():
                removed = prune(session, cutoff)
            if removed:
                log.info("pruned %d telemetry rows older than %g days", removed, days)
        except Exception:
            log.exception("telemetry pruning failed")


@dataclass(frozen=True)
class _Pending:
    raw: RawMessage
    mid: int  # the MQTT packet id, acked once the message is stored
    qos: int
