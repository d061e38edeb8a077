"""A device's MQTT side, as the tests drive it: a real paho client with real credentials."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from protocol.mqtt import new_client

WAIT = 10.0


@dataclass
class DeviceClient:
    host: str
    port: int
    device_id: str
    secret: str
    received: list[mqtt.MQTTMessage] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    got_message: threading.Event = field(default_factory=threading.Event)
    suback: list[list[ReasonCode]] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)
    connect_reason: ReasonCode | None = None

    def __post_init__(self) -> None:
        self.client = new_client(self.device_id, self.device_id, self.secret)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def connect(self) -> bool:
        self.client.connect(self.host, self.port, keepalive=10)
        self.client.loop_start()
        self.connected.wait(WAIT)
        return self.connect_reason is not None and not self.connect_reason.is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)

    def subscribe(self, topic: str) -> list[ReasonCode]:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(WAIT), "no SUBACK"
        return self.suback[-1]

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: ReasonCode, p: Any) -> None:
        self.connect_reason = reason
        self.connected.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, reason: ReasonCode, p: Any) -> None:
        self.disconnected.set()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        self.received.append(msg)
        self.got_message.set()

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: list[ReasonCode], p: Any) -> None:
        self.suback.append(codes)
        self.subscribed.set()
