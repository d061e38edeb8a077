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

from protocol.messages import (
    Availability,
    DesiredState,
    DevicePayload,
    Payload,
    TelemetryBatch,
    UpdateReport,
)

DEFAULT_PREFIX = "edgefleet"
# The server replicas' shared-subscription group.
SHARE_GROUP = "fleet"

# fullmatch, not match: `$` would let a trailing newline through.
_DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")
# MQTT forbids U+0000 in topic names; `+` and `#` would turn a name into a filter.
_FORBIDDEN_IN_LEVEL = ("+", "#", "\x00")
# A prefix also ends up in broker ACLs and configuration lines, where whitespace ends an
# option and `%` starts a substitution (`%u`, `%c`): its levels keep to these characters.
_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_.-]+")


class TopicKind(StrEnum):
    AVAILABILITY = "availability"
    DESIRED = "desired"
    REPORTS = "reports"
    TELEMETRY = "telemetry"


_KINDS = frozenset(k.value for k in TopicKind)


class Side(StrEnum):
    """Who publishes on a topic."""

    DEVICE = "device"
    SERVER = "server"


@dataclass(frozen=True)
class TopicSpec:
    """How a topic is used: who publishes, at which QoS, whether the broker retains it."""

    publisher: Side
    qos: int
    retained: bool
    payload: type[Payload]

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos}")


SPEC: dict[TopicKind, TopicSpec] = {
    # Retained so that whoever subscribes learns the device's last state at once; the last
    # will is the retained `offline` message, so a device that vanishes is marked offline.
    TopicKind.AVAILABILITY: TopicSpec(Side.DEVICE, qos=1, retained=True, payload=Availability),
    # Retained so that a device that was offline finds its target the moment it subscribes.
    TopicKind.DESIRED: TopicSpec(Side.SERVER, qos=1, retained=True, payload=DesiredState),
    TopicKind.REPORTS: TopicSpec(Side.DEVICE, qos=1, retained=False, payload=UpdateReport),
    TopicKind.TELEMETRY: TopicSpec(Side.DEVICE, qos=1, retained=False, payload=TelemetryBatch),
}
# What a device may publish, and what it receives: its broker ACLs say exactly this.
DEVICE_PUBLISHED = tuple(kind for kind, spec in SPEC.items() if spec.publisher is Side.DEVICE)
SERVER_PUBLISHED = tuple(kind for kind, spec in SPEC.items() if spec.publisher is Side.SERVER)


def payload_type(kind: TopicKind) -> type[Payload]:
    """The payload class of a topic kind."""
    return SPEC[TopicKind(kind)].payload


def device_payload_type(kind: TopicKind) -> type[DevicePayload]:
    """The payload class of a kind devices publish; ValueError for the others."""
    payload = payload_type(kind)
    if payload is Availability or payload is UpdateReport or payload is TelemetryBatch:
        return payload
    raise ValueError(f"devices do not publish on {TopicKind(kind)} topics")


def shared(group: str, topic_filter: str) -> str:
    """The shared subscription `$share/{group}/{topic_filter}`: the broker hands each
    message to one member of the group."""
    if not _SHARE_GROUP.fullmatch(group):
        raise ValueError(f"share group {group!r} must be 1-64 letters, digits, '_' or '-'")
    return f"$share/{group}/{topic_filter}"


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
        if not _PREFIX_LEVEL.fullmatch(level):
            raise ValueError(
                f"topic prefix {prefix!r}: level {level!r} may hold only letters, digits, "
                "'.', '_' or '-'"
            )


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

    def everything(self) -> str:
        """The filter for every topic of the fleet (the server's broker ACLs)."""
        return f"{self.prefix}/#"

    def server_subscriptions(self, group: str | None = None) -> list[str]:
        """The server's subscriptions to every device-published topic.

        With a `group`, shared ones: `$share/{group}/...` makes the broker hand each message
        to one member of the group, so server replicas split the load instead of each
        processing every message. Without, plain ones, for a single server: Mosquitto 2.0
        restores plain subscriptions of a persistent session after a restart but not shared
        ones, so what devices send between a broker restart and the server's resubscribing
        reaches only a plain subscription.
        """
        filters = [f"{self.prefix}/devices/+/{kind}" for kind in DEVICE_PUBLISHED]
        return filters if group is None else [shared(group, f) for f in filters]

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
    "DEVICE_PUBLISHED",
    "SERVER_PUBLISHED",
    "SHARE_GROUP",
    "SPEC",
    "Side",
    "TopicKind",
    "TopicSpec",
    "Topics",
    "check_device_id",
    "device_payload_type",
    "payload_type",
    "shared",
]
