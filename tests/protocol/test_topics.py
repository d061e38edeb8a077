from __future__ import annotations

import pytest

from protocol.messages import Availability, DesiredState, Payload, TelemetryBatch, UpdateReport
from protocol.topics import (
    DEFAULT_PREFIX,
    DEVICE_PUBLISHED,
    SERVER_PUBLISHED,
    SPEC,
    Side,
    TopicKind,
    Topics,
    TopicSpec,
    check_device_id,
    device_payload_type,
    shared,
)

TOPICS = Topics()


def test_builders_use_the_default_prefix() -> None:
    assert DEFAULT_PREFIX == "edgefleet"
    assert TOPICS.availability("pi-07") == "edgefleet/devices/pi-07/availability"
    assert TOPICS.desired("pi-07") == "edgefleet/devices/pi-07/desired"
    assert TOPICS.reports("pi-07") == "edgefleet/devices/pi-07/reports"
    assert TOPICS.telemetry("pi-07") == "edgefleet/devices/pi-07/telemetry"
    assert TOPICS.device_subtree("pi-07") == "edgefleet/devices/pi-07/#"


def test_a_prefix_may_have_several_levels() -> None:
    topics = Topics("acme/prod")
    assert topics.reports("a_1") == "acme/prod/devices/a_1/reports"
    assert topics.parse("acme/prod/devices/a_1/reports") == ("a_1", TopicKind.REPORTS)


def test_topic_kinds() -> None:
    assert [k.value for k in TopicKind] == ["availability", "desired", "reports", "telemetry"]


@pytest.mark.parametrize("device_id", ["a", "pi-07", "A_b-9", "x" * 64])
def test_good_device_ids(device_id: str) -> None:
    assert check_device_id(device_id) == device_id


@pytest.mark.parametrize(
    "device_id",
    ["", "x" * 65, "a/b", "a+b", "+", "#", "a#", "$SYS", "$share", "a.b", "a b", "dév", "pi-07\n"],
)
def test_bad_device_ids(device_id: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64 letters, digits, '_' or '-'"):
        check_device_id(device_id)


@pytest.mark.parametrize("device_id", ["+", "#", "a/b", "$x", ""])
def test_builders_refuse_bad_device_ids(device_id: str) -> None:
    for build in (
        TOPICS.availability,
        TOPICS.desired,
        TOPICS.reports,
        TOPICS.telemetry,
        TOPICS.device_subtree,
    ):
        with pytest.raises(ValueError, match="device id"):
            build(device_id)


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("", "must not be empty"),
        ("$SYS", "must not start with '\\$'"),
        ("$share/g/edgefleet", "must not start with '\\$'"),
        ("/edgefleet", "must not start or end with '/'"),
        ("edgefleet/", "must not start or end with '/'"),
        ("acme//prod", "empty level"),
        ("acme/+/prod", "must not contain '\\+', '#' or NUL"),
        ("acme/#", "must not contain"),
        ("fleet+1", "must not contain"),
        ("acme\x00", "must not contain"),
        # Broker configuration lines end at whitespace and expand `%u`.
        ("acme prod", "may hold only letters, digits"),
        ("fleet%u", "may hold only letters, digits"),
        ("flotte/é", "may hold only letters, digits"),
    ],
)
def test_bad_prefixes(prefix: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Topics(prefix)


def test_server_subscriptions_cover_what_devices_publish_shared_or_not() -> None:
    assert TOPICS.server_subscriptions() == [
        "edgefleet/devices/+/availability",
        "edgefleet/devices/+/reports",
        "edgefleet/devices/+/telemetry",
    ]
    assert TOPICS.server_subscriptions("fleet") == [
        "$share/fleet/edgefleet/devices/+/availability",
        "$share/fleet/edgefleet/devices/+/reports",
        "$share/fleet/edgefleet/devices/+/telemetry",
    ]
    assert Topics("acme/prod").server_subscriptions("replicas") == [
        "$share/replicas/acme/prod/devices/+/availability",
        "$share/replicas/acme/prod/devices/+/reports",
        "$share/replicas/acme/prod/devices/+/telemetry",
    ]


@pytest.mark.parametrize("group", ["", "a/b", "+", "#", "g$", "x" * 65])
def test_bad_share_groups(group: str) -> None:
    with pytest.raises(ValueError, match="share group"):
        TOPICS.server_subscriptions(group)


@pytest.mark.parametrize("kind", list(TopicKind))
def test_parse_inverts_the_builders(kind: TopicKind) -> None:
    assert TOPICS.parse(TOPICS.topic("pi-07", kind)) == ("pi-07", kind)
    device_id, parsed = TOPICS.parse(f"edgefleet/devices/pi-07/{kind.value}")
    assert parsed is kind
    assert device_id == "pi-07"


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("other/devices/x/reports", "not a device topic: it must start with 'edgefleet/devices/'"),
        ("edgefleet2/devices/pi-07/reports", "not a device topic"),
        ("edgefleet/device/pi-07/reports", "not a device topic"),
        ("/edgefleet/devices/pi-07/reports", "not a device topic"),
        ("$share/fleet/edgefleet/devices/pi-07/reports", "not a device topic"),
        ("$SYS/broker/uptime", "not a device topic"),
        ("acme/prod/devices/pi-07/reports", "not a device topic"),
        ("edgefleet/devices/pi-07", "got 1 level"),
        ("edgefleet/devices/", "got 1 level"),
        ("edgefleet/devices/#", "got 1 level"),
        ("edgefleet/devices/pi-07/reports/extra", "got 3 level"),
        ("edgefleet/devices/pi-07/reports/", "got 3 level"),
        ("edgefleet/devices/pi-07/status", "unknown kind 'status'"),
        ("edgefleet/devices/pi-07/+", "unknown kind '\\+'"),
        ("edgefleet/devices/pi-07/#", "unknown kind '#'"),
        ("edgefleet/devices/pi-07/", "unknown kind ''"),
        ("edgefleet/devices/pi-07/Reports", "unknown kind 'Reports'"),
        ("edgefleet/devices/+/reports", "device id '\\+' must be"),
        ("edgefleet/devices//reports", "device id '' must be"),
        ("edgefleet/devices/$x/reports", "device id '\\$x' must be"),
        ("edgefleet/devices/pi\x00/reports", "device id 'pi\\\\x00' must be"),
    ],
)
def test_parse_refuses_what_is_not_exactly_a_device_topic(topic: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TOPICS.parse(topic)


def test_parse_errors_quote_the_topic() -> None:
    with pytest.raises(ValueError, match=r"^topic 'edgefleet/devices/\+/telemetry': device id"):
        TOPICS.parse("edgefleet/devices/+/telemetry")


@pytest.mark.parametrize(
    ("kind", "publisher", "retained", "payload"),
    [
        (TopicKind.AVAILABILITY, Side.DEVICE, True, Availability),
        (TopicKind.DESIRED, Side.SERVER, True, DesiredState),
        (TopicKind.REPORTS, Side.DEVICE, False, UpdateReport),
        (TopicKind.TELEMETRY, Side.DEVICE, False, TelemetryBatch),
    ],
)
def test_spec_table(
    kind: TopicKind, publisher: Side, retained: bool, payload: type[Payload]
) -> None:
    assert SPEC[kind] == TopicSpec(publisher, 1, retained, payload)


def test_spec_covers_every_kind() -> None:
    assert set(SPEC) == set(TopicKind)


def test_topic_spec_qos_must_be_an_mqtt_qos() -> None:
    with pytest.raises(ValueError, match="qos must be 0, 1 or 2"):
        TopicSpec(Side.DEVICE, 3, False, Availability)


def test_devices_publish_what_their_acls_allow_and_receive_the_rest() -> None:
    assert set(DEVICE_PUBLISHED) | set(SERVER_PUBLISHED) == set(TopicKind)
    assert SERVER_PUBLISHED == (TopicKind.DESIRED,)
    assert TOPICS.server_subscriptions() == [
        f"edgefleet/devices/+/{kind}" for kind in DEVICE_PUBLISHED
    ]


def test_the_payload_of_a_device_topic_is_never_a_desired_state() -> None:
    for kind in DEVICE_PUBLISHED:
        assert device_payload_type(kind) is SPEC[kind].payload
    with pytest.raises(ValueError, match="devices do not publish on desired topics"):
        device_payload_type(TopicKind.DESIRED)


def test_shared_subscriptions_check_their_group() -> None:
    assert shared("fleet", "edgefleet/#") == "$share/fleet/edgefleet/#"
    with pytest.raises(ValueError, match="share group"):
        shared("a/b", "edgefleet/#")
