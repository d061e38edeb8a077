"""MQTT topic names: the one place that knows how topics are built and taken apart.

Every device has a subtree `{prefix}/devices/{device_id}/` with four topics, one per
`TopicKind`. The broker limits each device to its own subtree (see docs/protocol.md), so
the device id in a topic name is trustworthy only because `check_device_id` never lets an
MQTT wildcard, separator or `$` into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from protocol.messages import Availability, DesiredState, TelemetryBatch, UpdateReport

DEFAULT_PREFIX = "edgefleet"

# fullmatch, not match: `$` would let a trailing newline through.
_DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")
# MQTT forbids U+0000 in topic names; `+` and `#` would turn a name into a filter.
_FORBIDDEN_IN_LEVEL = ("+", "#", "\x00")


class TopicKind(StrEnum):
    AVAILABILITY = "availability"
    DESIRED = "desired"
    REPORTS = "reports"
    TELEMETRY = "telemetry"


_KINDS = frozenset(k.value for k in TopicKind)


@dataclass(frozen=True)
class TopicSpec:
    """How a topic is used: who publishes, at which QoS, whether the broker retains it."""

    publisher: Literal["device", "server"]
    qos: int
    retained: bool
    payload: type

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos}")


SPEC: dict[TopicKind, TopicSpec] = {
    # Retained so that whoever subscribes learns the device's last state at once; the last
    # will is the retained `offline` message, so a device that vanishes is marked offline.
    TopicKind.AVAILABILITY: TopicSpec("device", qos=1, retained=True, payload=Availability),
    # Retained so that a device that was offline finds its target the moment it subscribes.
    TopicKind.DESIRED: TopicSpec("server", qos=1, retained=True, payload=DesiredState),
    TopicKind.REPORTS: TopicSpec("device", qos=1, retained=False, payload=UpdateReport),
    TopicKind.TELEMETRY: TopicSpec("device", qos=1, retained=False, payload=TelemetryBatch),
}


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it is 1-64 of `[A-Za-z0-9_-]`, else raise ValueError."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(
            f"device id {device_id!r} must be 1-64 letters, digits, '_' or '-' "
            "(no '/', '+', '#' or '$')"
        )
    return device_id


def _check_prefix(prefix: str) -> None:
    if not prefix:
        raise ValueError("topic prefix must not be empty")
    if prefix.startswith("$"):
        # Brokers reserve `$` topics ($SYS, $share, ...) and wildcards never match them.
        raise ValueError(f"topic prefix {prefix!r} must not start with '$'")
    if prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"topic prefix {prefix!r} must not start or end with '/'")
    for level in prefix.split("/"):
        if not level:
            raise ValueError(f"topic prefix {prefix!r} has an empty level ('//')")
        if any(c in level for c in _FORBIDDEN_IN_LEVEL):
            raise ValueError(f"topic prefix {prefix!r} must not contain '+', '#' or NUL")


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (a deployment may run several fleets on one broker)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)

    def topic(self, device_id: str, kind: TopicKind) -> str:
        return f"{self.prefix}/devices/{check_device_id(device_id)}/{TopicKind(kind)}"

    def availability(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.AVAILABILITY)

    def desired(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.DESIRED)

    def reports(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.REPORTS)

    def telemetry(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.TELEMETRY)

    def device_subtree(self, device_id: str) -> str:
        """The filter for everything of one device (for broker ACLs and debugging)."""
        return f"{self.prefix}/devices/{check_device_id(device_id)}/#"

    def server_subscriptions(self, group: str | None = None) -> list[str]:
        """The server's subscriptions to every device-published topic.

        With a `group`, shared ones: `$share/{group}/...` makes the broker hand each message
        to one member of the group, so server replicas split the load instead of each
        processing every message. Without, plain ones, for a single server: Mosquitto 2.0
        restores plain subscriptions of a persistent session after a restart but not shared
        ones, so what devices send between a broker restart and the server's resubscribing
        reaches only a plain subscription.
        """
        if group is not None and not _SHARE_GROUP.fullmatch(group):
            raise ValueError(f"share group {group!r} must be 1-64 letters, digits, '_' or '-'")
        share = f"$share/{group}/" if group is not None else ""
        return [
            f"{share}{self.prefix}/devices/+/{kind}"
            for kind, spec in SPEC.items()
            if spec.publisher == "device"
        ]

    def parse(self, topic: str) -> tuple[str, TopicKind]:
        """Split one of our device topics into (device_id, kind), or raise ValueError."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not a device topic: it must start with {head!r}")
        levels = topic[len(head) :].split("/")
        if len(levels) != 2:
            raise ValueError(
                f"topic {topic!r} must be {head}<device_id>/<kind>, "
                f"got {len(levels)} level(s) after {head!r}"
            )
        device_id, kind = levels
        if kind not in _KINDS:
            known = ", ".join(TopicKind)
            raise ValueError(f"topic {topic!r} has unknown kind {kind!r} (expected {known})")
        try:
            check_device_id(device_id)
        except ValueError as exc:
            raise ValueError(f"topic {topic!r}: {exc}") from None
        return device_id, TopicKind(kind)


__all__ = [
    "DEFAULT_PREFIX",
    "SPEC",
    "TopicKind",
    "TopicSpec",
    "Topics",
    "check_device_id",
]
