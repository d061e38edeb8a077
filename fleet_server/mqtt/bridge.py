"""The server's MQTT connection: desired states out, availability, reports and telemetry in.

paho's network thread only checks and queues; one writer thread turns the queue into
batched transactions, so the broker is never kept waiting on the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import select

from fleet_server.models import DesiredState, utcnow
from fleet_server.mqtt.ingest import Received, prune, write_batch
from fleet_server.state import DesiredPublisher, FleetState
from protocol.messages import MAX_PAYLOAD_BYTES, PayloadError, decode_payload, payload_type
from protocol.topics import SPEC, TopicKind

log = logging.getLogger("fleet_server.mqtt")

BATCH_MAX = 2000
BATCH_WINDOW_S = 0.05
QUEUE_MAX = 100_000
PRUNE_EVERY_S = 3600.0
WRITE_ATTEMPTS = 3
# How long the broker keeps the server's session (and queues for it) while it is away.
SESSION_EXPIRY_S = 7 * 24 * 3600


def _session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    # Acks wait for the batch's commit, so a batch can only be as large as what the broker
    # lets us hold unacknowledged.
    properties.ReceiveMaximum = BATCH_MAX
    return properties


class MqttBridge(DesiredPublisher):
    def __init__(
        self,
        state: FleetState,
        host: str,
        port: int,
        username: str,
        password: str,
        client_id: str | None = None,
    ) -> None:
        self.state = state
        self.host, self.port = host, port
        self._queue: queue.Queue[Received] = queue.Queue(maxsize=QUEUE_MAX)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._logged: set[tuple[str, str]] = set()
        # A stable id and a persistent session: what arrives while the server is down is
        # queued by the broker and delivered when it is back. Acks go out only once a
        # message is in the database (manual_ack), so a crash loses nothing either.
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"fleet-server-{socket.gethostname()}-{state.settings.port}",
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._writer = threading.Thread(target=self._write_loop, name="mqtt-writer", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
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
        self._writer.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

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
            self.state.topics.desired(device_id), payload, qos=spec.qos, retain=spec.retained
        )

    def forget_device(self, device_id: str) -> None:
        """Clear the decommissioned device's retained messages. A kick sends no last will,
        so without this its availability would read "online" for ever."""
        for topic in (
            self.state.topics.desired(device_id),
            self.state.topics.availability(device_id),
        ):
            # An empty retained payload removes the retained message from the broker.
            self._client.publish(topic, b"", qos=1, retain=True)

    def _republish_desired(self) -> None:
        """After a (re)connect: the database is the truth, even if the broker lost state."""
        with self.state.sessions() as session:
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
        client.subscribe([(t, 1) for t in self.state.topics.server_subscriptions()])
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
        received = self._check(msg)
        if received is None:
            client.ack(msg.mid, msg.qos)  # refused for good: redelivering it changes nothing
            return
        try:
            self._queue.put_nowait(received)
        except queue.Full:
            # Not acked: the broker keeps it and redelivers once we catch up.
            self.state.metrics.mqtt_messages.labels("all", "queue_full").inc()

    def _check(self, msg: mqtt.MQTTMessage) -> Received | None:
        metrics = self.state.metrics
        try:
            device_id, kind = self.state.topics.parse(msg.topic)
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
        try:
            message = decode_payload(payload_type(kind), bytes(msg.payload))
        except PayloadError as exc:
            metrics.mqtt_invalid.labels(kind.value, "schema").inc()
            self._log_once(device_id, f"schema:{kind}", f"{msg.topic}: {exc}")
            return None
        metrics.mqtt_messages.labels(kind.value, "accepted").inc()
        return Received(device_id, message, utcnow(), msg.mid, msg.qos)  # type: ignore[arg-type]

    def _log_once(self, device_id: str, reason: str, text: str) -> None:
        """One line per device and reason: a chatty broken device must not flood the log."""
        if (device_id, reason) not in self._logged:
            self._logged.add((device_id, reason))
            log.warning("invalid MQTT payload from %s: %s", device_id, text)

    # -- the writer thread ----------------------------------------------------------------

    def _next_batch(self) -> list[Received]:
        try:
            first = self._queue.get(timeout=0.2)
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
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._next_batch()
            self.state.metrics.ingest_queue.set(self._queue.qsize())
            if batch:
                self._write(batch)
            if time.monotonic() - last_prune > PRUNE_EVERY_S:
                last_prune = time.monotonic()
                self._prune()

    def _write(self, batch: list[Received]) -> None:
        metrics = self.state.metrics
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self.state.sessions() as session, session.begin():
                    result = write_batch(session, batch)
            except Exception:
                log.exception("writing %d messages failed (attempt %d)", len(batch), attempt + 1)
                time.sleep(0.5 * 2**attempt)
                continue
            metrics.ingest_batch.observe(len(batch))
            metrics.mqtt_duplicates.labels("all").inc(result.duplicates)
            if result.unknown_device:
                metrics.mqtt_invalid.labels("all", "unknown_device").inc(result.unknown_device)
            break
        else:
            # A database that refuses a batch this often will refuse its redelivery too;
            # dropping it (counted) keeps the stream moving for everyone else.
            metrics.mqtt_messages.labels("all", "write_failed").inc(len(batch))
        for item in batch:
            self._client.ack(item.mid, item.qos)
            self._queue.task_done()

    def _prune(self) -> None:
        days = self.state.settings.telemetry_retention_days
        cutoff = utcnow() - dt.timedelta(days=days)
        try:
            with self.state.sessions() as session, session.begin():
                removed = prune(session, cutoff)
            if removed:
                log.info("pruned %d telemetry rows older than %g days", removed, days)
        except Exception:
            log.exception("telemetry pruning failed")
