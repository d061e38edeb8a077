"""Alerts without a database: the signature, the settings, backoff, and one POST to a
real local receiver."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from pydantic import ValidationError

from fleet_server.alerts.deliver import post, retry_delay
from fleet_server.alerts.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    signature,
    verify_signature,
)
from fleet_server.settings import Settings
from tests.fleet_server.webhook_receiver import closed_port_url, receiving

BODY = b'{"id":"abc","kind":"rollout.paused"}'


def signed(secret: bytes, body: bytes, timestamp: int) -> dict[str, str]:
    return {
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        TIMESTAMP_HEADER: str(timestamp),
    }


# --- the signature ---------------------------------------------------------------------------


def test_a_signature_verifies_with_the_secret_and_only_with_it() -> None:
    now = int(time.time())
    headers = signed(b"s3cr3t", BODY, now)
    assert verify_signature("s3cr3t", BODY, headers)
    assert verify_signature(b"s3cr3t", BODY, {k.lower(): v for k, v in headers.items()})
    assert not verify_signature("wrong", BODY, headers)
    assert not verify_signature("s3cr3t", BODY.replace(b"paused", b"resumed"), headers)


def test_the_timestamp_is_signed_and_an_old_request_is_refused() -> None:
    then = 1_800_000_000
    headers = signed(b"k", BODY, then)
    assert verify_signature("k", BODY, headers, now=then + 299)
    assert not verify_signature("k", BODY, headers, now=then + 301)  # a replay, later
    moved = {**headers, TIMESTAMP_HEADER: str(then + 600)}  # a fresh stamp on an old signature
    assert not verify_signature("k", BODY, moved, now=then + 600)


@pytest.mark.parametrize(
    "headers",
    [{}, {SIGNATURE_HEADER: "sha256=00"}, {TIMESTAMP_HEADER: "1"}],
)
def test_a_request_without_signature_or_timestamp_does_not_verify(
    headers: dict[str, str],
) -> None:
    assert not verify_signature("k", BODY, headers)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    expected = hmac.new(b"k", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert signature(b"k", 1_700_000_000, BODY) == f"sha256={expected}"


# --- settings --------------------------------------------------------------------------------


def settings_error(**values: object) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    return str(caught.value)


def test_a_webhook_url_must_be_http_and_is_not_echoed_in_the_error() -> None:
    error = settings_error(webhooks=[{"url": "ftp://token-xyz@files/hook"}])
    assert "webhooks.0.url" in error
    assert "must start with http:// or https://, not ftp://" in error
    assert "token-xyz" not in error
    assert "has no host" in settings_error(webhooks=[{"url": "https:///path"}])
    assert "invalid port" in settings_error(webhooks=[{"url": "http://h:99999/"}])


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"alert_offline_after_s": -5}, "alert_offline_after_s", "greater than 0"),
        ({"alert_min_accuracy": 1.5}, "alert_min_accuracy", "less than or equal to 1"),
        ({"alert_accuracy_min_labelled": 0}, "alert_accuracy_min_labelled", "greater than 0"),
        ({"alert_interval_s": -1}, "alert_interval_s", "greater than or equal to 0"),
        ({"webhook_timeout_s": 0}, "webhook_timeout_s", "greater than 0"),
        ({"webhook_max_attempts": 0}, "webhook_max_attempts", "greater than 0"),
        (
            {"webhooks": [{"url": "http://h/", "events": ["rollout.exploded"]}]},
            "webhooks.0.events",
            "Input should be 'rollout.paused'",
        ),
        ({"webhooks": [{"url": "http://h/", "events": []}]}, "webhooks.0.events", "at least one"),
        ({"webhooks": [{"url": "http://h/", "colour": "red"}]}, "webhooks.0.colour", "Extra"),
        (
            {"webhooks": [{"url": "http://a/", "name": "x"}, {"url": "http://b/", "name": "x"}]},
            "webhooks",
            "two webhooks are called 'x'",
        ),
    ],
)
def test_bad_alert_settings_say_which_and_why(
    values: dict[str, object], field: str, message: str
) -> None:
    error = settings_error(**values)
    assert f"\n{field}" in error
    assert message in error


def test_webhooks_come_from_json_in_the_environment_and_the_secret_stays_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "EDGEFLEET_WEBHOOKS",
        '[{"url": "https://hooks.example/T0/abc", "secret": "s3cr3t",'
        ' "events": ["device.offline"]}, {"url": "http://10.0.0.2:9000/", "name": "pager"}]',
    )
    monkeypatch.setenv("EDGEFLEET_ALERT_MIN_ACCURACY", "0.8")
    monkeypatch.setenv("EDGEFLEET_ALERT_OFFLINE_AFTER_S", "off")
    settings = Settings()
    first, second = settings.webhooks
    assert first.secret_bytes() == b"s3cr3t"
    assert first.wants("device.offline")
    assert not first.wants("rollout.paused")
    assert second.secret is None
    assert second.wants("rollout.paused")
    assert (first.label.startswith("hooks.example-"), second.label) == (True, "pager")
    assert (settings.alert_min_accuracy, settings.alert_offline_after_s) == (0.8, None)
    shown = repr(settings) + str(settings.model_dump())
    assert "s3cr3t" not in shown
    assert "T0/abc" not in repr(settings)


# --- backoff and one POST --------------------------------------------------------------------


def test_retries_back_off_exponentially_up_to_the_cap() -> None:
    settings = Settings(webhook_backoff_s=10, webhook_max_backoff_s=100)
    delays = [retry_delay(n, settings) for n in range(1, 7)]
    assert delays == [dt.timedelta(seconds=s) for s in (10, 20, 40, 80, 100, 100)]
    assert retry_delay(10_000, settings) == dt.timedelta(seconds=100)


def test_a_post_is_ok_on_2xx_and_says_what_failed_otherwise() -> None:
    with receiving(script=[200, 500, 302]) as receiver:
        assert post(receiver.url, BODY, {"X-Test": "1"}, 5) is None
        assert post(receiver.url, BODY, {}, 5) == "HTTP 500: receiver says no"
        assert (post(receiver.url, BODY, {}, 5) or "").startswith("HTTP 302")  # not followed
        assert receiver.wait_for(3)
        first = receiver.requests[0]
        assert (first.body, first.headers["X-Test"]) == (BODY, "1")
    refused = post(closed_port_url(), BODY, {}, 5) or ""
    assert refused.startswith("connection failed")
    assert "127.0.0.1" not in refused  # nothing of the URL, which may be the credential


def test_a_receiver_that_hangs_is_given_up_on_after_the_timeout() -> None:
    with receiving() as receiver:
        receiver.hold.clear()  # it reads the request and never answers
        assert post(receiver.url, BODY, {}, 0.3) == "timed out after 0.3 s"
        assert receiver.wait_for(1)
