"""The server process's own Prometheus counters (HTTP, MQTT, ingest), in a registry per
app so that several apps can live in one process. The fleet's state (devices, rollouts,
gates, field performance) is read from the database when `/metrics` is scraped: see
`fleet_server.metrics.fleet`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protocol.topics import DEVICE_PUBLISHED


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.http_requests = Counter(
            "edgefleet_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.mqtt_messages = Counter(
            "edgefleet_mqtt_messages",
            "MQTT messages received, by result: accepted (decoded under the wire contract), "
            "queue_full (left unacked for redelivery), write_failed (dropped after retries)",
            ["kind", "result"],
            registry=r,
        )
        self.mqtt_invalid = Counter(
            "edgefleet_mqtt_invalid_payloads",
            "MQTT messages refused: bad topic, oversized, off the wire contract, unknown device",
            ["kind", "reason"],
            registry=r,
        )
        self.mqtt_duplicates = Counter(
            "edgefleet_mqtt_duplicates", "QoS 1 redeliveries dropped", ["kind"], registry=r
        )
        self.ingest_batch = Histogram(
            "edgefleet_ingest_batch_messages",
            "Messages per batch handed to the ingest process to write",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000),
            registry=r,
        )
        self.ingest_queue = Gauge(
            "edgefleet_ingest_queue_depth", "Messages waiting to be written", registry=r
        )
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Export every label set the bridge can count, from the start: a series that
        appears only with its first event hides that first event from rate(), and a
        dashboard querying it shows "no data" rather than 0 until then."""
        for kind in DEVICE_PUBLISHED:
            self.mqtt_messages.labels(kind, "accepted")
            self.mqtt_invalid.labels(kind, "schema")
            self.mqtt_invalid.labels(kind, "oversized")
        for result in ("queue_full", "write_failed"):
            self.mqtt_messages.labels("all", result)
        self.mqtt_invalid.labels("unknown", "topic")
        self.mqtt_invalid.labels("all", "unknown_device")
        self.mqtt_duplicates.labels("all")
