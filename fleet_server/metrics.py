"""Prometheus metrics, in a registry per app so that several apps can live in one process."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.http_requests = Counter(
            "edgefleet_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.mqtt_messages = Counter(
            "edgefleet_mqtt_messages", "MQTT messages received", ["kind", "result"], registry=r
        )
        self.mqtt_invalid = Counter(
            "edgefleet_mqtt_invalid_payloads",
            "MQTT payloads rejected by the wire contract",
            ["kind", "reason"],
            registry=r,
        )
        self.mqtt_duplicates = Counter(
            "edgefleet_mqtt_duplicates", "QoS 1 redeliveries dropped", ["kind"], registry=r
        )
        self.ingest_batch = Histogram(
            "edgefleet_ingest_batch_messages",
            "Messages written per database batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000),
            registry=r,
        )
        self.ingest_queue = Gauge(
            "edgefleet_ingest_queue_depth", "Messages waiting to be written", registry=r
        )
        self.devices = Gauge("edgefleet_devices", "Devices by status", ["status"], registry=r)
        self.mqtt_connected = Gauge(
            "edgefleet_mqtt_connected", "1 while the bridge is connected", registry=r
        )
        self.models = Gauge("edgefleet_models", "Registered model versions", registry=r)
