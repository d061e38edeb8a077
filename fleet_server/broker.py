"""Mosquitto as the fleet's gatekeeper: writing its configuration and provisioning devices.

Every device logs in with username = its device id and a password the server issued, and
may touch only its own topics. Access is enforced by Mosquitto's dynamic-security plugin:
one role per device (`device-{id}`) holding exactly that device's ACLs, one role for the
fleet server, and a default of "deny" for everything not granted. The plugin is driven
while the broker runs, over `$CONTROL/dynamic-security/v1`, so decommissioning a device
kicks its live connection at once instead of waiting for a broker restart.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import json
import os
import pwd
import re
import secrets
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.topics import TopicKind, Topics

PLUGIN_FILE = "mosquitto_dynamic_security.so"
CONFIG_FILE = "mosquitto.conf"
DYNSEC_FILE = "dynamic-security.json"
CREDENTIALS_FILE = "server-credentials.json"
LOG_FILE = "mosquitto.log"
PID_FILE = "mosquitto.pid"
DATA_DIR = "data"

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
SHARE_GROUP = "fleet"
DEFAULT_PREFIX = "edgefleet"

DEVICE_PUBLISHES = ("availability", "reports", "telemetry")
DEVICE_RECEIVES = "desired"
SERVER_ROLE = "fleet-server"
DEVICE_ROLE_PREFIX = "device-"

# Mosquitto's own default; the passwords are long random tokens, so a slow hash would
# only cost broker CPU on every CONNECT without making them any harder to guess.
_HASH_ITERATIONS = 101
_SALT_BYTES = 12
_COMMAND_TIMEOUT = 5.0
# The plugin's error texts that the callers below treat as "already so".
_ROLE_EXISTS = "Role already exists"
_NOT_FOUND = ("Client not found", "Role not found")

# Ids end up inside topic filters and ACL patterns, so `/`, `+`, `#` and a leading `$`
# would widen what a device may touch; anything outside this set is refused outright.
# The same rule as protocol.topics.check_device_id, so every id accepted here has topics.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")

# Library folders of Debian/Ubuntu (multiarch), Alpine, Fedora and source installs.
_PLUGIN_DIRS = (
    "/usr/lib/{multiarch}",
    "/usr/lib/*-linux-gnu*",
    "/usr/lib",
    "/usr/lib/mosquitto",
    "/usr/lib64",
    "/usr/lib64/mosquitto",
    "/usr/local/lib",
    "/usr/local/lib/mosquitto",
)


class BrokerAdminError(RuntimeError):
    """The broker or its dynamic-security plugin refused or did not answer a command."""


@dataclass(frozen=True)
class BrokerCredentials:
    username: str
    password: str = field(repr=False)


def find_dynsec_plugin(search_dirs: Iterable[Path | str] | None = None) -> Path:
    """The dynamic-security plugin's path; FileNotFoundError naming the package if absent."""
    dirs = [str(d) for d in search_dirs] if search_dirs is not None else _default_plugin_dirs()
    for directory in dirs:
        for candidate in _expand(directory):
            if (candidate / PLUGIN_FILE).is_file():
                return candidate / PLUGIN_FILE
    searched = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"Mosquitto's dynamic-security plugin ({PLUGIN_FILE}) was not found in {searched}. "
        "Install Mosquitto 2.0 or newer, which ships it: `apt-get install mosquitto` "
        "(Debian/Ubuntu) or `apk add mosquitto` (Alpine)."
    )


def _expand(directory: str) -> list[Path]:
    if not any(c in directory for c in "*?["):
        return [Path(directory)]
    return sorted(Path(p) for p in glob.glob(directory))


def _default_plugin_dirs() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or "*-linux-gnu*"
    return [d.format(multiarch=multiarch) for d in _PLUGIN_DIRS]


def write_broker_config(
    out: Path,
    *,
    port: int = 1883,
    host: str = "127.0.0.1",
    server_username: str = "fleet-server",
    prefix: str = DEFAULT_PREFIX,
    force: bool = False,
    plugin: Path | None = None,
) -> BrokerCredentials:
    """Write mosquitto.conf, dynamic-security.json and server-credentials.json into `out`.

    The broker is configured to run as the account calling this, because it must write
    the plugin's JSON and its `data/` folder, which are created private to that account.
    `force=True` replaces an existing configuration, forgetting every provisioned device.
    """
    _check_listener(host, port)
    _check_name(server_username, "server username")
    _check_prefix(prefix)
    out = out.resolve()
    _check_config_path(out)
    existing = [out / n for n in (CONFIG_FILE, DYNSEC_FILE, CREDENTIALS_FILE)]
    existing = [p for p in existing if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise FileExistsError(f"{names} already exist; pass force=True to replace them")
    plugin = plugin if plugin is not None else find_dynsec_plugin()

    credentials = BrokerCredentials(server_username, secrets.token_urlsafe(32))
    out.mkdir(parents=True, exist_ok=True)
    (out / DATA_DIR).mkdir(mode=0o700, exist_ok=True)
    creds_json = {"username": credentials.username, "password": credentials.password}
    _write_private(out / CREDENTIALS_FILE, json.dumps(creds_json, indent=2) + "\n")
    dynsec = _dynsec_document(credentials, prefix)
    _write_private(out / DYNSEC_FILE, json.dumps(dynsec, indent=2) + "\n")
    # Written last: a complete mosquitto.conf means the files it names are in place.
    _write_private(out / CONFIG_FILE, _mosquitto_conf(out, host, port, plugin), mode=0o644)
    return credentials


def load_server_credentials(path: Path) -> BrokerCredentials:
    """Read server-credentials.json (the file, or the folder holding it)."""
    if path.is_dir():
        path = path / CREDENTIALS_FILE
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), str) for k in ("username", "password")
    ):
        raise ValueError(f"{path}: expected an object with string username and password")
    return BrokerCredentials(data["username"], data["password"])


def _check_listener(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, got {port}")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"invalid listener host {host!r}")


def _check_config_path(out: Path) -> None:
    # Mosquitto reads each option up to the end of its line; a newline would inject options.
    if "\n" in str(out) or "\r" in str(out):
        raise ValueError(f"config folder path must not contain line breaks: {out!r}")


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid {what} {name!r}: use 1-64 letters, digits, '_' or '-'")


def _check_prefix(prefix: str) -> None:
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"invalid topic prefix {prefix!r}: '/'-separated levels of letters, digits, "
            "'.', '_' or '-' (no wildcards, no leading '$', no empty levels)"
        )


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write via a temporary file and rename, so the mode holds from the first byte on."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, mode)  # the umask may have narrowed it; make it exact
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mosquitto_conf(out: Path, host: str, port: int, plugin: Path) -> str:
    account = pwd.getpwuid(os.geteuid()).pw_name
    return "\n".join(
        [
            "# Written by edgefleet (fleet_server.broker.write_broker_config).",
            "# Devices and their ACLs live in dynamic-security.json, managed at run time",
            f"# through {CONTROL_TOPIC}; do not edit that file while the broker runs.",
            "per_listener_settings false",
            f"listener {port} {host}",
            "allow_anonymous false",
            f"user {account}",
            f"plugin {plugin}",
            f"plugin_opt_config_file {out / DYNSEC_FILE}",
            "persistence true",
            # Mosquitto before 2.0 appends the file name verbatim; 2.0 adds its own '/'.
            f"persistence_location {out / DATA_DIR}/",
            # Retained desired states are re-published by the server anyway; this bounds
            # what a broker crash (not a clean stop, which always saves) can lose.
            "autosave_interval 60",
            # The defaults (1000 queued, 20 in flight per client) make Mosquitto discard
            # QoS 1 messages for a subscriber that falls behind, after the publisher got its
            # PUBACK: a fleet server catching up after a restart would lose telemetry.
            # The server acks in database batches, so it needs many messages in flight.
            "max_queued_messages 1000000",
            "max_inflight_messages 10000",
            f"pid_file {out / PID_FILE}",
            f"log_dest file {out / LOG_FILE}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "",
        ]
    )


def _dynsec_document(server: BrokerCredentials, prefix: str) -> dict[str, Any]:
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": [
            {
                "username": server.username,
                "textName": "edgefleet fleet server",
                **_password_fields(server.password),
                "roles": [{"rolename": SERVER_ROLE}],
            }
        ],
        "groups": [],
        "roles": [
            {
                "rolename": SERVER_ROLE,
                "textName": "edgefleet fleet server",
                "acls": _server_acls(prefix),
            }
        ],
    }


def _password_fields(password: str) -> dict[str, Any]:
    """The plugin's stored form: PBKDF2-HMAC-SHA512 over a 12-byte salt, base64."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _HASH_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _HASH_ITERATIONS,
    }


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def _server_acls(prefix: str) -> list[dict[str, Any]]:
    everything = f"{prefix}/#"
    # The plugin checks a shared subscription against its full `$share/...` filter, so
    # `{prefix}/#` alone does not cover it.
    shared = f"$share/{SHARE_GROUP}/{prefix}/#"
    return [
        _acl("publishClientSend", everything),
        _acl("publishClientReceive", everything),
        _acl("subscribePattern", everything),
        _acl("unsubscribePattern", everything),
        _acl("subscribePattern", shared),
        _acl("unsubscribePattern", shared),
        _acl("publishClientSend", CONTROL_TOPIC),
        _acl("publishClientReceive", RESPONSE_TOPIC),
        _acl("subscribeLiteral", RESPONSE_TOPIC),
        _acl("unsubscribeLiteral", RESPONSE_TOPIC),
    ]


def _device_topic(prefix: str, device_id: str, kind: str) -> str:
    return Topics(prefix).topic(device_id, TopicKind(kind))


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


def device_role(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def device_acls(device_id: str, prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Exactly what one device may do; everything else falls to the default deny."""
    desired = _device_topic(prefix, device_id, DEVICE_RECEIVES)
    acls = [
        _acl("publishClientSend", _device_topic(prefix, device_id, kind))
        for kind in DEVICE_PUBLISHES
    ]
    acls += [
        _acl("subscribeLiteral", desired),
        _acl("publishClientReceive", desired),
        # Unsubscribing is denied by default too; without this the agent's own clean-up
        # of its one subscription would be refused.
        _acl("unsubscribeLiteral", desired),
    ]
    return acls


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
    number of threads may issue commands at once. Build one with `BrokerAdmin.connect`,
    which also re-subscribes after paho reconnects. The constructor takes over an already
    connected client whose network loop runs; whoever owns that client must then call
    `subscribe_responses()` after every reconnect.
    """

    def __init__(
        self,
        client: mqtt.Client,
        *,
        username: str | None = None,
        timeout: float = _COMMAND_TIMEOUT,
    ) -> None:
        self._client = client
        self._username = username
        self._timeout = timeout
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        # Set while the response subscription is in place: the broker handles one
        # connection's packets in order, so a command sent after SUBSCRIBE was queued gets
        # its answer delivered, with no need to wait for the SUBACK.
        self._ready = threading.Event()
        client.message_callback_add(RESPONSE_TOPIC, self._on_response)
        self.subscribe_responses()

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        credentials: BrokerCredentials,
        *,
        client_id: str | None = None,
        timeout: float = _COMMAND_TIMEOUT,
    ) -> BrokerAdmin:
        """Log in as the server user and check that the plugin answers."""
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            # Random by default: two server processes sharing a client id would keep
            # taking the session from each other.
            client_id=client_id or f"{credentials.username}-admin-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(credentials.username, credentials.password)
        _connect_and_wait(client, host, port, timeout)
        admin = cls(client, username=credentials.username, timeout=timeout)
        client.on_connect = admin._on_reconnect
        client.on_disconnect = admin._on_disconnect
        try:
            admin._run([{"command": "getDefaultACLAccess"}])
        except BrokerAdminError as error:
            admin.close()
            raise BrokerAdminError(
                f"{error}; is {credentials.username!r} allowed to publish to {CONTROL_TOPIC} "
                f"and subscribe to {RESPONSE_TOPIC}?"
            ) from error
        return admin

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
        _check_prefix(prefix)
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
        _check_name(device_id, "device id")
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
