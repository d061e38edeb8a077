"""Device isolation and revocation, checked against a real Mosquitto with dynsec."""

from __future__ import annotations

import json
import os
import queue
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleet_server.mqtt.broker_admin import BrokerAdmin, BrokerAdminError
from fleet_server.mqtt.broker_config import (
    CONFIG_FILE,
    CONTROL_TOPIC,
    CREDENTIALS_FILE,
    DYNSEC_FILE,
    BrokerCredentials,
    device_acls,
    device_role,
    find_dynsec_plugin,
    load_server_credentials,
    write_broker_config,
)
from protocol.topics import Topics
from tests.fleet_server.conftest import RunningBroker

# Generous: a loaded 2-core CI machine must not turn a slow answer into a failure.
TIMEOUT = 10.0

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
V311_SUBSCRIBE_FAILURE = 0x80
ADMINISTRATIVE_ACTION = 0x98
REFUSED_LOGIN = {NOT_AUTHORIZED, BAD_CREDENTIALS}

PROTOCOLS = [
    pytest.param(mqtt.MQTTv5, id="mqtt5"),
    pytest.param(mqtt.MQTTv311, id="mqtt311"),
]


def topic(device_id: str, kind: str) -> str:
    return f"edgefleet/devices/{device_id}/{kind}"


class _Results:
    """Futures keyed by (kind, mid): a callback may fire before the caller asks for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[tuple[str, int], Future[Any]] = {}

    def _future(self, key: tuple[str, int]) -> Future[Any]:
        with self._lock:
            return self._futures.setdefault(key, Future())

    def resolve(self, key: tuple[str, int], value: Any) -> None:
        self._future(key).set_result(value)

    def wait(self, key: tuple[str, int]) -> Any:
        return self._future(key).result(TIMEOUT)


class Peer:
    """One MQTT client whose every callback is recorded for the test to wait on."""

    def __init__(
        self,
        broker: RunningBroker,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        protocol: MQTTProtocolVersion = mqtt.MQTTv5,
    ) -> None:
        self.broker = broker
        self.protocol = protocol
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else (username or ""),
            protocol=protocol,
            # A test peer that was kicked or refused must stay down until told otherwise,
            # and paho's reconnect back-off would also stall loop_stop() for up to 1 s.
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connacks: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks = _Results()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def connect(self) -> ReasonCode:
        """The CONNACK's reason code."""
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        reason = self.connacks.get(timeout=TIMEOUT)
        if reason.is_failure:
            self.close()
        return reason

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic_filter: str) -> ReasonCode:
        result, mid = self.client.subscribe(topic_filter, qos=1)
        assert result == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert mid is not None
        (reason,) = self._acks.wait(("sub", mid))
        assert isinstance(reason, ReasonCode)
        return reason

    def unsubscribe(self, topic_filter: str) -> ReasonCode:
        result, mid = self.client.unsubscribe(topic_filter)
        assert result == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert mid is not None
        (reason,) = self._acks.wait(("unsub", mid))
        assert isinstance(reason, ReasonCode)
        return reason

    def publish(self, topic_name: str, payload: str, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic_name, payload, qos=1, retain=retain)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        reason = self._acks.wait(("pub", info.mid))
        assert isinstance(reason, ReasonCode)
        return reason

    def send(self, topic_name: str, payload: str, *, retain: bool = False) -> None:
        """Publish at QoS 1 and insist the broker accepted it."""
        reason = self.publish(topic_name, payload, retain=retain)
        # "No matching subscribers" (0x10) is a success too, hence not `== 0`.
        assert not reason.is_failure, f"{topic_name}: {reason}"

    def next_message(self) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no message arrived within {TIMEOUT} s") from None

    def wait_disconnected(self) -> ReasonCode:
        try:
            return self.disconnects.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"still connected after {TIMEOUT} s") from None

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.connacks.put(reason)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.disconnects.put(reason)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        self._acks.resolve(("sub", mid), reasons)

    def _on_unsubscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        self._acks.resolve(("unsub", mid), reasons)

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._acks.resolve(("pub", mid), reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)


PeerFactory = Callable[..., Peer]


@pytest.fixture
def peer(broker: RunningBroker) -> Iterator[PeerFactory]:
    """Make Peers on the test's broker; every one is closed at the end of the test."""
    made: list[Peer] = []

    def make(username: str | None, password: str | None = None, **options: Any) -> Peer:
        made.append(Peer(broker, username, password, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def online(make: PeerFactory, username: str, password: str, **options: Any) -> Peer:
    connected = make(username, password, **options)
    reason = connected.connect()
    assert not reason.is_failure, f"{username} was refused: {reason}"
    return connected


def server_peer(make: PeerFactory, broker: RunningBroker) -> Peer:
    creds = broker.credentials
    return online(make, creds.username, creds.password, client_id="server-under-test")


def provision(admin: BrokerAdmin, device_id: str) -> str:
    password = secrets.token_urlsafe(24)
    admin.add_device(device_id, password)
    return password


def receive_until(subscriber: Peer, marker: bytes) -> list[tuple[str, bytes]]:
    """Every message up to and including `marker`.

    Mosquitto forwards one client's QoS 1 messages in order, so once the marker (sent
    last) arrives, anything sent before it that was going to arrive has arrived.
    """
    seen: list[tuple[str, bytes]] = []
    while not seen or seen[-1][1] != marker:
        msg = subscriber.next_message()
        seen.append((msg.topic, bytes(msg.payload)))
    return seen


# --- logging in ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("who", ["unknown user", "wrong password", "anonymous"])
def test_bad_logins_are_refused_at_connect(
    broker_admin: BrokerAdmin, peer: PeerFactory, who: str, protocol: MQTTProtocolVersion
) -> None:
    provision(broker_admin, "dev-a")
    username, password = {
        "unknown user": ("intruder", "whatever"),
        "wrong password": ("dev-a", "not-the-password"),
        "anonymous": (None, None),
    }[who]

    reason = peer(username, password, client_id="dev-a", protocol=protocol).connect()

    assert reason.is_failure
    assert reason.value in REFUSED_LOGIN


def test_a_device_must_use_its_own_id_as_client_id(
    broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    # Otherwise dev-a could connect as client "dev-b" and take over (kick) dev-b's session.
    password = provision(broker_admin, "dev-a")
    provision(broker_admin, "dev-b")

    reason = peer("dev-a", password, client_id="dev-b").connect()

    assert reason.value in REFUSED_LOGIN


def test_admin_connect_with_a_wrong_password_fails(broker: RunningBroker) -> None:
    wrong = BrokerCredentials(broker.credentials.username, "wrong")
    with pytest.raises(BrokerAdminError, match="refused the login"):
        BrokerAdmin(broker.host, broker.port, wrong).open()


# --- what a device may do ---------------------------------------------------------------


def test_device_publishes_its_topics_and_receives_its_retained_desired_state(
    broker: RunningBroker, broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    password = provision(broker_admin, "dev-a")
    server = server_peer(peer, broker)
    assert not server.subscribe("edgefleet/devices/+/+").is_failure
    server.send(topic("dev-a", "desired"), '{"model": "digits"}', retain=True)
    assert server.next_message().topic == topic("dev-a", "desired")  # its own echo

    device = online(peer, "dev-a", password)
    for kind in ("telemetry", "reports", "availability"):
        device.send(topic("dev-a", kind), kind)
    received = [server.next_message() for _ in range(3)]
    assert [(m.topic, m.payload) for m in received] == [
        (topic("dev-a", kind), kind.encode()) for kind in ("telemetry", "reports", "availability")
    ]

    assert device.subscribe(topic("dev-a", "desired")).value == 1  # granted QoS 1
    desired = device.next_message()
    assert (desired.topic, desired.payload, desired.retain) == (
        topic("dev-a", "desired"),
        b'{"model": "digits"}',
        True,
    )
    # Unsubscribing is denied by default too, so the role must grant it for `desired`.
    assert not device.unsubscribe(topic("dev-a", "desired")).is_failure


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "topic_filter",
    [
        topic("dev-b", "desired"),
        topic("dev-b", "telemetry"),
        "edgefleet/devices/dev-b/#",
        "edgefleet/devices/+/desired",
        "#",
        "$share/fleet/edgefleet/devices/+/telemetry",
        "$CONTROL/dynamic-security/v1/response",
        "$SYS/#",
    ],
)
def test_device_cannot_subscribe_beyond_its_desired_topic(
    broker_admin: BrokerAdmin,
    peer: PeerFactory,
    topic_filter: str,
    protocol: MQTTProtocolVersion,
) -> None:
    password = provision(broker_admin, "dev-a")
    provision(broker_admin, "dev-b")
    device = online(peer, "dev-a", password, protocol=protocol)

    reason = device.subscribe(topic_filter)

    assert reason.is_failure
    expected = NOT_AUTHORIZED if protocol == mqtt.MQTTv5 else V311_SUBSCRIBE_FAILURE
    assert reason.value == expected, str(reason)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_device_cannot_publish_outside_its_own_topics(
    broker: RunningBroker,
    broker_admin: BrokerAdmin,
    peer: PeerFactory,
    protocol: MQTTProtocolVersion,
) -> None:
    password = provision(broker_admin, "dev-a")
    provision(broker_admin, "dev-b")
    server = server_peer(peer, broker)
    assert not server.subscribe("edgefleet/#").is_failure
    device = online(peer, "dev-a", password, protocol=protocol)
    forbidden = [
        topic("dev-a", "desired"),  # only the server sets what a device should run
        topic("dev-b", "telemetry"),
        topic("dev-b", "desired"),
        "edgefleet/devices/dev-b",
        "edgefleet/fleet/announcements",
    ]

    for target in forbidden:
        reason = device.publish(target, "forged")
        if protocol == mqtt.MQTTv5:  # MQTT 3.1.1 has no way to say no; it drops silently
            assert reason.value == NOT_AUTHORIZED, f"{target}: {reason}"
    device.send(topic("dev-a", "telemetry"), "marker")

    assert receive_until(server, b"marker") == [(topic("dev-a", "telemetry"), b"marker")]


def test_device_cannot_send_dynsec_commands(broker_admin: BrokerAdmin, peer: PeerFactory) -> None:
    password = provision(broker_admin, "dev-a")
    device = online(peer, "dev-a", password)
    command = {
        "commands": [{"command": "createClient", "username": "intruder", "password": "intruder-pw"}]
    }

    reason = device.publish(CONTROL_TOPIC, json.dumps(command))

    assert reason.value == NOT_AUTHORIZED
    # The PUBACK goes out after the broker has dealt with the message, so had the command
    # run, the login would exist by now.
    assert peer("intruder", "intruder-pw").connect().value in REFUSED_LOGIN


# --- what the server may do -------------------------------------------------------------


def test_server_receives_telemetry_through_its_shared_subscription(
    broker: RunningBroker, broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    password = provision(broker_admin, "dev-a")
    server = server_peer(peer, broker)
    assert server.subscribe("$share/fleet/edgefleet/devices/+/telemetry").value == 1

    device = online(peer, "dev-a", password)
    device.send(topic("dev-a", "telemetry"), '{"latency_ms": 3}')

    msg = server.next_message()
    assert (msg.topic, msg.payload) == (topic("dev-a", "telemetry"), b'{"latency_ms": 3}')


# --- revoking ---------------------------------------------------------------------------


def test_removing_a_device_kicks_it_and_locks_it_out(
    broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    password = provision(broker_admin, "dev-a")
    device = online(peer, "dev-a", password)

    broker_admin.remove_device("dev-a")

    assert device.wait_disconnected().value == ADMINISTRATIVE_ACTION
    device.close()
    assert peer("dev-a", password).connect().value in REFUSED_LOGIN
    broker_admin.remove_device("dev-a")  # a retried decommission is not an error
    broker_admin.remove_device("never-existed")


def test_a_removed_device_can_be_provisioned_again(
    broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    provision(broker_admin, "dev-a")
    broker_admin.remove_device("dev-a")

    password = provision(broker_admin, "dev-a")

    device = online(peer, "dev-a", password)
    device.send(topic("dev-a", "telemetry"), "back")


def test_new_password_replaces_the_old_one_and_kicks_the_live_session(
    broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    old = provision(broker_admin, "dev-a")
    device = online(peer, "dev-a", old)

    broker_admin.set_device_password("dev-a", "the-new-password")

    # Not asked for, but the plugin does it: the device must reconnect with the new one.
    assert device.wait_disconnected().value == ADMINISTRATIVE_ACTION
    device.close()
    assert peer("dev-a", old).connect().value in REFUSED_LOGIN
    online(peer, "dev-a", "the-new-password")


# --- the admin API ----------------------------------------------------------------------


def test_adding_an_existing_device_fails_and_leaves_it_working(
    broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    password = provision(broker_admin, "dev-a")

    with pytest.raises(BrokerAdminError, match="Client already exists"):
        broker_admin.add_device("dev-a", "another-password")

    device = online(peer, "dev-a", password)
    device.send(topic("dev-a", "telemetry"), "still here")


def _leave_role_behind(admin: BrokerAdmin, device_id: str, prefix: str) -> None:
    """What an add_device interrupted after creating the role leaves behind."""
    command = {
        "command": "createRole",
        "rolename": device_role(device_id),
        "acls": device_acls(device_id, prefix),
    }
    assert "error" not in admin._run([command])[0]


def test_a_leftover_role_with_the_right_acls_is_reused(
    broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    _leave_role_behind(broker_admin, "dev-a", "edgefleet")

    password = provision(broker_admin, "dev-a")

    online(peer, "dev-a", password).send(topic("dev-a", "telemetry"), "ok")


def test_a_leftover_role_with_other_acls_is_replaced_on_the_next_try(
    broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    _leave_role_behind(broker_admin, "dev-a", "another-fleet")

    with pytest.raises(BrokerAdminError, match="not the ACLs requested"):
        broker_admin.add_device("dev-a", "first-try")
    assert peer("dev-a", "first-try").connect().value in REFUSED_LOGIN

    password = provision(broker_admin, "dev-a")
    online(peer, "dev-a", password).send(topic("dev-a", "telemetry"), "ok")


def test_setting_the_password_of_an_unknown_device_fails(broker_admin: BrokerAdmin) -> None:
    with pytest.raises(BrokerAdminError, match="Client not found"):
        broker_admin.set_device_password("never-existed", "pw")


@pytest.mark.parametrize(
    "device_id", ["", "a/b", "+", "#", "dev+", "$SYS", " dev", "dev\n", "dev.1", "d" * 65]
)
def test_device_ids_that_could_widen_an_acl_are_refused(
    broker_admin: BrokerAdmin, device_id: str
) -> None:
    with pytest.raises(ValueError, match=r"device id .* must be 1-64 letters"):
        broker_admin.add_device(device_id, "pw")
    with pytest.raises(ValueError, match=r"device id .* must be 1-64 letters"):
        broker_admin.remove_device(device_id)


def test_the_server_login_cannot_be_managed_as_a_device(
    broker: RunningBroker, broker_admin: BrokerAdmin
) -> None:
    with pytest.raises(ValueError, match="fleet server's own login"):
        broker_admin.remove_device(broker.credentials.username)


def test_commands_from_many_threads_are_matched_to_their_answers(
    broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    ids = [f"dev-{n}" for n in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        passwords = dict(zip(ids, pool.map(lambda i: provision(broker_admin, i), ids), strict=True))
        list(pool.map(broker_admin.remove_device, ids[6:]))

    for device_id in ids[:6]:
        online(peer, device_id, passwords[device_id]).close()
    for device_id in ids[6:]:
        assert peer(device_id, passwords[device_id]).connect().value in REFUSED_LOGIN


def test_devices_retained_state_and_admin_survive_a_broker_restart(
    broker: RunningBroker, broker_admin: BrokerAdmin, peer: PeerFactory
) -> None:
    password = provision(broker_admin, "dev-a")
    server = server_peer(peer, broker)
    server.send(topic("dev-a", "desired"), "v1", retain=True)
    server.close()

    broker.process.restart()

    device = online(peer, "dev-a", password)
    assert device.subscribe(topic("dev-a", "desired")).value == 1
    msg = device.next_message()
    assert (msg.payload, msg.retain) == (b"v1", True)
    _wait_until_admin_answers(broker_admin)
    broker_admin.remove_device("dev-a")
    assert device.wait_disconnected().value == ADMINISTRATIVE_ACTION


def _wait_until_admin_answers(admin: BrokerAdmin) -> None:
    """The admin's client reconnects on its own, after paho's back-off (1 s at first)."""
    deadline = time.monotonic() + 2 * TIMEOUT
    while True:
        try:
            admin.remove_device("never-existed")
            return
        except BrokerAdminError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # polling for the reconnect, not waiting for an outcome


# --- configuration ----------------------------------------------------------------------


def test_config_files_are_written_private_and_on_loopback(tmp_path: Path) -> None:
    out = tmp_path / "broker"

    creds = write_broker_config(out, port=18830)

    for name in (CONFIG_FILE, DYNSEC_FILE, CREDENTIALS_FILE):
        assert (out / name).is_file(), name
    assert stat.S_IMODE(os.stat(out / CREDENTIALS_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / DYNSEC_FILE).st_mode) == 0o600
    assert (out / "data").is_dir()
    lines = (out / CONFIG_FILE).read_text().splitlines()
    assert [line for line in lines if line.startswith("listener")] == ["listener 18830 127.0.0.1"]
    assert "allow_anonymous false" in lines
    assert "persistence true" in lines
    assert f"persistence_location {out / 'data'}/" in lines
    assert f"plugin_opt_config_file {out / DYNSEC_FILE}" in lines
    assert load_server_credentials(out) == creds
    assert creds.username == "fleet-server"
    assert creds.password not in repr(creds)
    assert creds.password not in (out / DYNSEC_FILE).read_text()  # only its hash


def test_config_binds_beyond_loopback_only_when_asked(tmp_path: Path) -> None:
    write_broker_config(tmp_path, host="0.0.0.0", port=8883)

    assert "listener 8883 0.0.0.0" in (tmp_path / CONFIG_FILE).read_text().splitlines()


def test_config_is_not_overwritten_unless_forced(tmp_path: Path) -> None:
    first = write_broker_config(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    with pytest.raises(FileExistsError, match="force=True"):
        write_broker_config(tmp_path, port=1884)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before

    second = write_broker_config(tmp_path, port=1884, force=True)
    assert second.password != first.password
    assert load_server_credentials(tmp_path) == second


@pytest.mark.parametrize(
    "options",
    [{"port": 0}, {"host": "0.0.0.0 1884"}, {"server_username": "a/b"}, {"prefix": "fleet/#"}],
)
def test_config_rejects_values_that_would_break_it(tmp_path: Path, options: Any) -> None:
    with pytest.raises(ValueError, match=r"invalid|port|topic prefix"):
        write_broker_config(tmp_path, **options)
    assert not any(tmp_path.iterdir())


def test_missing_plugin_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install mosquitto"):
        find_dynsec_plugin([tmp_path, tmp_path / "lib"])


def test_plugin_is_found_in_a_searched_folder(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    plugin = tmp_path / "lib" / "mosquitto_dynamic_security.so"
    plugin.write_bytes(b"")

    assert find_dynsec_plugin([tmp_path / "nothing-here", tmp_path / "*"]) == plugin


@pytest.mark.parametrize(
    "prefix", ["acme/prod", "fleet.v2", "a_b-c", "$SYS", "fleet/#", "acme prod", "x//y", "é"]
)
def test_broker_config_takes_exactly_the_prefixes_the_wire_contract_takes(
    tmp_path: Path, prefix: str
) -> None:
    plugin = tmp_path / "mosquitto_dynamic_security.so"
    out = tmp_path / "broker"
    refusal = _refusal(lambda: Topics(prefix))
    assert _refusal(lambda: write_broker_config(out, prefix=prefix, plugin=plugin)) == refusal
    if refusal is not None:
        assert not out.exists()
    else:
        roles = json.loads((out / DYNSEC_FILE).read_text())["roles"]
        assert f"{prefix}/#" in {acl["topic"] for acl in roles[0]["acls"]}


def _refusal(call: Callable[[], object]) -> str | None:
    """The ValueError's message, or None when `call` went through."""
    try:
        call()
    except ValueError as error:
        return str(error)
    return None
