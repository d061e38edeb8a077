"""The device's MQTT connection: availability with a last will, desired states in, and the
outbox (reports and telemetry) out, in order, each item removed only once the broker
acknowledged it.

What is sent while the broker is away stays in the outbox; after a reconnect it goes out
again from the oldest. An item can therefore reach the server twice (sent, then the
connection dropped before the PUBACK); the server stores it once, by its seq or msg_id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.outbox import Outbox
from protocol.messages import MESSAGE_SCHEMA_VERSION, Availability, encode_payload
from protocol.mqtt import new_client
from protocol.topics import SPEC, TopicKind, Topics

log = logging.getLogger("edge_agent.link")

SEND_BATCH = 50
ACK_TIMEOUT_S = 15.0
# How long the broker keeps the session (and its queued desired states) for us.
SESSION_EXPIRY_S = 24 * 3600


class Link:
    def __init__(
        self,
        *,
        device_id: str,
        secret: str,
        host: str,
        port: int,
        topics: Topics,
        outbox: Outbox,
        on_desired: Callable[[bytes], None],
        agent_version: str,
        keepalive: int = 30,
    ) -> None:
        self.device_id = device_id
        self._topics = topics
        self._outbox = outbox
        self._on_desired = on_desired
        self._agent_version = agent_version
        self._host, self._port, self._keepalive = host, port, keepalive
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.last_error: str | None = None
        # The broker binds the client id to the login: it must be the device id.
        self._client = new_client(device_id, device_id, secret)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._sender = threading.Thread(target=self._send_loop, name="outbox-sender", daemon=True)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        # The last will says "offline" for us when the connection drops without a goodbye.
        will = encode_payload(Availability(MESSAGE_SCHEMA_VERSION, "offline", time.time(), None))
        topic = self._topics.availability(self.device_id)
        self._client.will_set(topic, will, qos=1, retain=True)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            self._host,
            self._port,
            keepalive=self._keepalive,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()
        self._sender.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._sender.join(timeout)
        if self.connected:
            # A clean goodbye sends no last will: say "offline" ourselves.
            offline = Availability(MESSAGE_SCHEMA_VERSION, "offline", time.time(), None)
            info = self._client.publish(
                self._topics.availability(self.device_id),
                encode_payload(offline),
                qos=1,
                retain=True,
            )
            info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    def wake(self) -> None:
        """Something was put in the outbox: send it now rather than at the next poll."""
        self._wake.set()

    # -- paho callbacks --------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = f"the broker refused the connection: {reason}"
            log.error("%s", self.last_error)
            return
        self.last_error = None
        online = Availability(MESSAGE_SCHEMA_VERSION, "online", time.time(), self._agent_version)
        spec = SPEC[TopicKind.AVAILABILITY]
        client.publish(
            self._topics.availability(self.device_id),
            encode_payload(online),
            qos=spec.qos,
            retain=spec.retained,
        )
        client.subscribe(self._topics.desired(self.device_id), qos=SPEC[TopicKind.DESIRED].qos)
        self._connected.set()
        self._wake.set()
        log.info("connected to %s:%d as %s", self._host, self._port, self.device_id)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return  # a cleared retained message: nothing is desired
        try:
            self._on_desired(bytes(msg.payload))
        except Exception:
            log.exception("handling a desired state failed")

    # -- the outbox ------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while self.connected and not self._stop.is_set():
                items = self._outbox.peek(SEND_BATCH)
                if not items:
                    break
                sent = self._send(items)
                self._outbox.remove(sent)
                if len(sent) < len(items):
                    break  # the connection went: wait for the next one

    def _send(self, items: list[Any]) -> list[int]:
        """Publish in order; return the ids the broker acknowledged (a prefix)."""
        infos = []
        for item in items:
            info = self._client.publish(item.topic, item.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            infos.append((item.id, info))
        done = []
        deadline = time.monotonic() + ACK_TIMEOUT_S
        for item_id, info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                break
            done.append(item_id)
        return done
