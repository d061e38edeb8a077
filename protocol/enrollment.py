"""Enrolment: the one HTTP exchange of the wire contract.

A device posts an `EnrollmentRequest` to `ENROLL_PATH` with a token an operator made;
the server answers an `EnrollmentAnswer`: the device's id and secret, and where and under
which topic prefix it speaks MQTT. The server validates requests with these classes (so a
rule here is a 422 there) and the agent reads the answer with `read_answer`, so neither
side can drift from the other.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from protocol.mqtt import DEFAULT_PORT
from protocol.schema import decode
from protocol.topics import Topics, check_device_id

ENROLL_PATH = "/api/v1/enroll"
MAX_TOKEN_CHARS = 256
MAX_NAME_CHARS = 128
MAX_TAGS = 32
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def check_tags(tags: list[str]) -> list[str]:
    """The tags, sorted and without repeats, if each is 1-64 of letters, digits, '_', '.',
    ':' or '-' (not first); else ValueError naming the bad ones."""
    bad = [t for t in tags if not _TAG.fullmatch(t)]
    if bad:
        raise ValueError(f"invalid tag(s) {bad}: use 1-64 letters, digits, '_', '.', ':' or '-'")
    return sorted(set(tags))


@dataclass(frozen=True)
class EnrollmentRequest:
    """What a device sends."""

    token: str
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= len(self.token) <= MAX_TOKEN_CHARS:
            raise ValueError(f"token must be 1-{MAX_TOKEN_CHARS} characters")
        if self.name is not None and not 1 <= len(self.name) <= MAX_NAME_CHARS:
            raise ValueError(f"name must be 1-{MAX_NAME_CHARS} characters")
        if len(self.tags) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags, got {len(self.tags)}")
        check_tags(self.tags)


@dataclass(frozen=True)
class MqttAccess:
    """Where the device's broker is (None: the host it enrolled with, the default port);
    it logs in with `username` and the answer's secret."""

    host: str | None
    port: int | None
    username: str
    topic_prefix: str

    def __post_init__(self) -> None:
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"mqtt.port must be 1-65535, got {self.port}")
        Topics(self.topic_prefix)  # raises ValueError naming what is wrong with it


@dataclass(frozen=True)
class EnrollmentAnswer:
    device_id: str
    secret: str
    mqtt: MqttAccess
    api_url: str  # where the device reaches the server's API from now on

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        if not self.secret:
            raise ValueError("secret must not be empty")
        if self.mqtt.username != self.device_id:
            raise ValueError("mqtt.username must be the device id (the broker's ACLs say so)")
        if urlsplit(self.api_url).scheme not in ("http", "https"):
            raise ValueError(f"api_url {self.api_url!r} must be an http(s) URL")

    def mqtt_url(self, enrolled_with: str) -> str:
        """mqtt://host:port, the host defaulting to the one of the URL the device enrolled
        with (`enrolled_with`)."""
        host = self.mqtt.host or urlsplit(enrolled_with).hostname
        return f"mqtt://{host}:{self.mqtt.port or DEFAULT_PORT}"


def read_answer(value: object) -> EnrollmentAnswer:
    """The server's answer, checked field by field (a missing one, or one of the wrong
    type, is a ValueError naming it). Fields this version does not know are skipped: the
    exchange has no schema version, so a newer server may add fields, never change them."""
    if not isinstance(value, dict) or not isinstance(value.get("mqtt"), dict):
        raise ValueError("the enrolment answer must be an object with an object 'mqtt'")
    known = _known(EnrollmentAnswer, value)
    return decode(EnrollmentAnswer, {**known, "mqtt": _known(MqttAccess, value["mqtt"])})


def _known(cls: type, value: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: item for key, item in value.items() if key in names}
