"""The enrolment exchange: what the server takes and what the agent accepts back."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.enrollment import (
    ENROLL_PATH,
    MAX_TAGS,
    EnrollmentAnswer,
    EnrollmentRequest,
    MqttAccess,
    read_answer,
)
from protocol.schema import SchemaError, decode, encode

ANSWER: dict[str, Any] = {
    "device_id": "dev-abc",
    "secret": "s3cret",
    "mqtt": {"host": None, "port": None, "username": "dev-abc", "topic_prefix": "acme/prod"},
    "api_url": "http://fleet.example:8080",
}


def test_the_path_is_under_the_api() -> None:
    assert ENROLL_PATH == "/api/v1/enroll"


def test_a_request_round_trips_through_json() -> None:
    request = EnrollmentRequest("efe_token", "pi-01", ["cam"], {"soc": "bcm2712"})
    assert encode(request) == {
        "token": "efe_token",
        "name": "pi-01",
        "tags": ["cam"],
        "hardware": {"soc": "bcm2712"},
    }
    assert decode(EnrollmentRequest, encode(request)) == request


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"token": ""}, "token must be 1-256 characters"),
        ({"token": "t" * 257}, "token must be 1-256 characters"),
        ({"token": "t", "name": ""}, "name must be 1-128 characters"),
        ({"token": "t", "tags": ["x"] * (MAX_TAGS + 1)}, "at most 32 tags"),
        ({"token": "t", "tags": ["site a"]}, r"invalid tag\(s\) \['site a'\]"),
        ({"token": "t", "tags": ["-lab"]}, "invalid tag"),
    ],
)
def test_bad_requests_say_what_is_wrong(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnrollmentRequest(**fields)


def test_the_answer_decodes_and_gives_the_broker_url() -> None:
    answer = read_answer(ANSWER)
    assert answer.mqtt == MqttAccess(None, None, "dev-abc", "acme/prod")
    # No host in the answer: the one the device enrolled with, on MQTT's default port.
    assert answer.mqtt_url("https://fleet.example:8443/") == "mqtt://fleet.example:1883"
    named = decode(
        EnrollmentAnswer, {**ANSWER, "mqtt": {**ANSWER["mqtt"], "host": "b", "port": 8883}}
    )
    assert named.mqtt_url("http://fleet.example") == "mqtt://b:8883"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device_id": "dev/1"}, "device id"),
        ({"secret": ""}, "secret must not be empty"),
        ({"api_url": "ftp://fleet.example"}, "must be an http"),
        ({"mqtt": {**ANSWER["mqtt"], "username": "someone-else"}}, "mqtt.username"),
        ({"mqtt": {**ANSWER["mqtt"], "port": 0}}, "mqtt.port"),
        ({"mqtt": {**ANSWER["mqtt"], "topic_prefix": "$SYS"}}, "topic prefix"),
        ({"mqtt": {**ANSWER["mqtt"], "port": "8883"}}, "port"),
        ({"mqtt": None}, "an object 'mqtt'"),
    ],
)
def test_an_answer_off_the_contract_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_answer({**ANSWER, **change})


def test_a_missing_field_is_named() -> None:
    answer = {k: v for k, v in ANSWER.items() if k != "api_url"}
    with pytest.raises(SchemaError, match="api_url"):
        read_answer(answer)


def test_fields_a_newer_server_adds_are_skipped() -> None:
    newer = {**ANSWER, "ca_pem": "...", "mqtt": {**ANSWER["mqtt"], "tls": True}}
    assert read_answer(newer) == read_answer(ANSWER)
    # The strict decoder, which the MQTT payloads use, would refuse them.
    with pytest.raises(SchemaError, match="ca_pem"):
        decode(EnrollmentAnswer, newer)
