"""Provisioning devices on a running Mosquitto through its dynamic-security plugin, over
`$CONTROL/dynamic-security/v1`: decommissioning a device kicks its live connection at
once instead of waiting for a broker restart."""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleet_server.mqtt.broker_config import (
    CONTROL_TOPIC,
    RESPONSE_TOPIC,
    BrokerCredentials,
    device_acls,
    device_role,
)
from protocol.mqtt import new_client
from protocol.topics import DEFAULT_PREFIX, Topics, check_device_id

_COMMAND_TIMEOUT = 5.0
# The plugin's error texts that the callers below treat as "already so".
_ROLE_EXISTS = "Role already exists"
_NOT_FOUND = ("Client not found", "Role not found")


class BrokerAdminError(RuntimeError):
    """The broker or its dynamic-security plugin refused or did not answer a command."""


def _removal(device_id: str) -> list[dict[str, Any]]:
    # The client first: deleting it is what kicks a live connection.
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": device_role(device_id)},
    ]


def _acl_set(acls: object) -> frozenset[tuple[str, str, bool]]:
    if not isinstance(acls, list):
        return frozenset()
    return frozenset(
        (str(a.get("acltype")), str(a.get("topic")), a.get("allow") is True)
        for a in acls
        if isinstance(a, dict)
    )


class _Pending:
    """Responses awaited for one batch of commands, keyed by correlationData."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        self.responses: dict[str, dict[str, Any]] = {}
        self.failure: str | None = None
        self.done = threading.Event()

    def deliver(self, correlation: str, response: dict[str, Any]) -> None:
        self.responses[correlation] = response
        if len(self.responses) == len(self.ids):
            self.done.set()

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.done.set()


class BrokerAdmin:
    """Provisions and revokes devices through the dynamic-security plugin.

    Commands carry a fresh correlationData each and responses are matched on it, so any
    number of threads may issue commands at once. `open()` logs in; after a lost
    connection paho reconnects and the response subscription is renewed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        credentials: BrokerCredentials,
        *,
        client_id: str | None = None,
        timeout: float = _COMMAND_TIMEOUT,
    ) -> None:
        self.host, self.port = host, port
        self._username = credentials.username
        self._timeout = timeout
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        # Set while the response subscription is in place: the broker handles one
        # connection's packets in order, so a command sent after SUBSCRIBE was queued gets
        # its answer delivered, with no need to wait for the SUBACK.
        self._ready = threading.Event()
        self._client = new_client(
            # Random by default: two server processes sharing a client id would keep
            # taking the session from each other.
            client_id or f"{credentials.username}-admin-{secrets.token_hex(4)}",
            credentials.username,
            credentials.password,
        )
        self._client.message_callback_add(RESPONSE_TOPIC, self._on_response)

    def open(self) -> BrokerAdmin:
        """Log in as the server user and check that the plugin answers; returns self."""
        _connect_and_wait(self._client, self.host, self.port, self._timeout)
        self.subscribe_responses()
        self._client.on_connect = self._on_reconnect
        self._client.on_disconnect = self._on_disconnect
        try:
            self._run([{"command": "getDefaultACLAccess"}])
        except BrokerAdminError as error:
            self.close()
            raise BrokerAdminError(
                f"{error}; is {self._username!r} allowed to publish to {CONTROL_TOPIC} "
                f"and subscribe to {RESPONSE_TOPIC}?"
            ) from error
        return self

    def close(self) -> None:
        self._ready.clear()
        self._client.disconnect()
        self._client.loop_stop()
        self._fail_all("the admin connection was closed")

    def __enter__(self) -> BrokerAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe_responses(self) -> None:
        """(Re-)subscribe to the plugin's responses; a fresh MQTT session has none."""
        self._client.subscribe(RESPONSE_TOPIC, qos=1)
        self._ready.set()

    def add_device(self, device_id: str, password: str, prefix: str = DEFAULT_PREFIX) -> None:
        """Create the device's role and its login; the login is bound to client id = id.

        On any failure nothing of the device is left behind, except that an existing
        device is never touched: adding it again raises BrokerAdminError with the plugin's
        "Client already exists".
        """
        self._check_device_id(device_id)
        Topics(prefix)  # raises ValueError for a prefix the wire contract refuses
        if not password:
            raise ValueError("a device password must not be empty")
        role = device_role(device_id)
        wanted = device_acls(device_id, prefix)
        create_role, create_client, get_role = self._run(
            [
                {
                    "command": "createRole",
                    "rolename": role,
                    "textname": f"edgefleet device {device_id}",
                    "acls": wanted,
                },
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": password,
                    # Binding the client id stops one device from taking over another's
                    # session (and so kicking it) by connecting under its client id.
                    "clientid": device_id,
                    "textname": f"edgefleet device {device_id}",
                    "roles": [{"rolename": role, "priority": 0}],
                },
                {"command": "getRole", "rolename": role},
            ]
        )
        role_error, client_error = create_role.get("error"), create_client.get("error")
        if client_error is not None:
            if role_error is None:
                self._undo([{"command": "deleteRole", "rolename": role}])
            # A role that failed to be created explains more than the "Role not found"
            # that the client creation then reports.
            reason = client_error if role_error in (None, _ROLE_EXISTS) else role_error
            raise BrokerAdminError(f"cannot add device {device_id!r}: {reason}")
        # createRole accepts unknown ACL types and invalid topics without a word, and a
        # role left over from an interrupted call may hold other ACLs: check what is stored.
        stored = get_role.get("data", {}).get("role", {}).get("acls", [])
        if _acl_set(stored) != _acl_set(wanted):
            self._undo(_removal(device_id))
            raise BrokerAdminError(
                f"cannot add device {device_id!r}: role {role!r} holds {stored}, not the "
                "ACLs requested; it was removed, so adding the device again starts afresh"
            )

    def remove_device(self, device_id: str) -> None:
        """Delete the device's login, which kicks a live connection, and its role.

        Removing an unknown device is not an error, so a retried decommission is safe.
        """
        self._check_device_id(device_id)
        commands = _removal(device_id)
        for command, response in zip(commands, self._run(commands), strict=True):
            error = response.get("error")
            if error is not None and error not in _NOT_FOUND:
                raise BrokerAdminError(f"{command['command']} failed: {error}")

    def set_device_password(self, device_id: str, password: str) -> None:
        """Replace the device's password.

        The plugin also kicks the device's live connection (without its will), so the
        device must already hold the new password, or it is locked out until it gets it.
        """
        self._check_device_id(device_id)
        if not password:
            raise ValueError("a device password must not be empty")
        (response,) = self._run(
            [{"command": "setClientPassword", "username": device_id, "password": password}]
        )
        if "error" in response:
            raise BrokerAdminError(
                f"cannot set the password of device {device_id!r}: {response['error']}"
            )

    def _check_device_id(self, device_id: str) -> None:
        # Ids end up inside topic filters and ACLs, so `/`, `+`, `#` and a leading `$`
        # would widen what a device may touch: the wire contract's rule refuses them.
        check_device_id(device_id)
        if device_id == self._username:
            raise ValueError(f"{device_id!r} is the fleet server's own login, not a device")

    def _undo(self, commands: list[dict[str, Any]]) -> None:
        """Best effort: the caller is about to raise the error that made this necessary."""
        with contextlib.suppress(BrokerAdminError):
            self._run(commands)

    def _run(self, commands: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Send commands as one message; their responses, in order, once all arrived."""
        ids = [uuid.uuid4().hex for _ in commands]
        pending = _Pending(ids)
        payload = {
            "commands": [
                {**cmd, "correlationData": cid} for cmd, cid in zip(commands, ids, strict=True)
            ]
        }
        if not self._ready.wait(self._timeout):
            raise BrokerAdminError(f"not connected to the broker for {self._timeout:g} s")
        with self._lock:
            for cid in ids:
                self._pending[cid] = pending
        try:
            self._publish(json.dumps(payload))
            if not pending.done.wait(self._timeout):
                names = ", ".join(str(cmd["command"]) for cmd in commands)
                raise BrokerAdminError(
                    f"no answer from the dynamic-security plugin to {names} "
                    f"within {self._timeout:g} s"
                )
        finally:
            with self._lock:
                for cid in ids:
                    self._pending.pop(cid, None)
        if pending.failure is not None:
            raise BrokerAdminError(pending.failure)
        return [pending.responses[cid] for cid in ids]

    def _publish(self, payload: str) -> None:
        # QoS 0 on purpose: with QoS 1 paho queues a message while disconnected and sends
        # it after reconnecting, so a command the caller already saw time out could still
        # run later. A command is only worth sending while someone waits for its answer.
        info = self._client.publish(CONTROL_TOPIC, payload, qos=0)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerAdminError(f"cannot send to the broker: {mqtt.error_string(info.rc)}")

    def _on_response(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return  # not the plugin's format; nothing is waiting for it
        if not isinstance(responses, list):
            return
        with self._lock:
            for response in responses:
                if not isinstance(response, dict):
                    continue
                pending = self._pending.get(str(response.get("correlationData")))
                if pending is not None:
                    pending.deliver(str(response["correlationData"]), response)

    def _on_reconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            self.subscribe_responses()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        # Answers to commands in flight would be lost with the session; fail them now
        # rather than leaving callers to sit out the whole timeout.
        self._ready.clear()
        self._fail_all(f"the connection to the broker was lost ({reason_code})")

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.fail(reason)


def _connect_and_wait(client: mqtt.Client, host: str, port: int, timeout: float) -> None:
    """Connect and wait for a successful CONNACK, then start paho's network thread."""
    answered = threading.Event()
    refusal: list[ReasonCode] = []

    def on_connect(
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            refusal.append(reason_code)
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port)
    except OSError as error:
        raise BrokerAdminError(f"cannot reach the broker at {host}:{port}: {error}") from error
    # The handshake runs in this thread: paho's own loop thread would keep retrying a
    # refused login in the background until stopped.
    deadline = time.monotonic() + timeout
    while not answered.is_set() and time.monotonic() < deadline:
        if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
            break
    if not answered.is_set() or refusal:
        client.disconnect()
        reason = (
            f"refused the login: {refusal[0]}"
            if refusal
            else f"did not accept the login within {timeout:g} s (no CONNACK)"
        )
        raise BrokerAdminError(f"the broker at {host}:{port} {reason}")
    client.loop_start()
