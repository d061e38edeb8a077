"""Mosquitto's configuration as the fleet needs it: the listener, the dynamic-security
plugin with the fleet server's login, and the ACLs each device gets.

Every device logs in with username = its device id and a password the server issued, and
may touch only its own topics. Access is enforced by Mosquitto's dynamic-security plugin:
one role per device (`device-{id}`) holding exactly that device's ACLs, one role for the
fleet server, and a default of "deny" for everything not granted. Devices are added and
removed while the broker runs (`fleet_server.mqtt.broker_admin`). Which topics a device
publishes and receives is the wire contract's (`protocol.topics`), not this module's.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import pwd
import secrets
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import write_atomic
from protocol.mqtt import DEFAULT_PORT
from protocol.topics import (
    DEFAULT_PREFIX,
    DEVICE_PUBLISHED,
    SERVER_PUBLISHED,
    SHARE_GROUP,
    Topics,
    check_device_id,
    shared,
)

PLUGIN_FILE = "mosquitto_dynamic_security.so"
CONFIG_FILE = "mosquitto.conf"
DYNSEC_FILE = "dynamic-security.json"
CREDENTIALS_FILE = "server-credentials.json"
LOG_FILE = "mosquitto.log"
PID_FILE = "mosquitto.pid"
DATA_DIR = "data"

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
SERVER_ROLE = "fleet-server"
DEVICE_ROLE_PREFIX = "device-"

# Mosquitto's own default; the passwords are long random tokens, so a slow hash would
# only cost broker CPU on every CONNECT without making them any harder to guess.
_HASH_ITERATIONS = 101
_SALT_BYTES = 12

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
    port: int = DEFAULT_PORT,
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
    _check_username(server_username)
    Topics(prefix)  # the wire contract's rule for prefixes, so every prefix here has topics
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
    _write_text(out / CREDENTIALS_FILE, json.dumps(creds_json, indent=2) + "\n")
    dynsec = _dynsec_document(credentials, prefix)
    _write_text(out / DYNSEC_FILE, json.dumps(dynsec, indent=2) + "\n")
    # Written last: a complete mosquitto.conf means the files it names are in place.
    _write_text(out / CONFIG_FILE, _mosquitto_conf(out, host, port, plugin), mode=0o644)
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


def _check_username(name: str) -> None:
    """The server's login obeys the device-id rule: it shares the namespace of logins."""
    try:
        check_device_id(name)
    except ValueError:
        raise ValueError(
            f"invalid server username {name!r}: use 1-64 letters, digits, '_' or '-'"
        ) from None


def _write_text(path: Path, text: str, mode: int = 0o600) -> None:
    # The mode holds from the first byte on: the credentials are never readable by others.
    write_atomic(path, text.encode("utf-8"), mode)


def _mosquitto_conf(out: Path, host: str, port: int, plugin: Path) -> str:
    account = pwd.getpwuid(os.geteuid()).pw_name
    return "\n".join(
        [
            "# Written by edgefleet (fleet_server.mqtt.broker_config.write_broker_config).",
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
    everything = Topics(prefix).everything()
    # The plugin checks a shared subscription against its full `$share/...` filter, so
    # `{prefix}/#` alone does not cover it.
    replicas = shared(SHARE_GROUP, everything)
    return [
        _acl("publishClientSend", everything),
        _acl("publishClientReceive", everything),
        _acl("subscribePattern", everything),
        _acl("unsubscribePattern", everything),
        _acl("subscribePattern", replicas),
        _acl("unsubscribePattern", replicas),
        _acl("publishClientSend", CONTROL_TOPIC),
        _acl("publishClientReceive", RESPONSE_TOPIC),
        _acl("subscribeLiteral", RESPONSE_TOPIC),
        _acl("unsubscribeLiteral", RESPONSE_TOPIC),
    ]


def device_role(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def device_acls(device_id: str, prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Exactly what one device may do; everything else falls to the default deny."""
    topics = Topics(prefix)
    acls = [_acl("publishClientSend", topics.topic(device_id, kind)) for kind in DEVICE_PUBLISHED]
    for kind in SERVER_PUBLISHED:
        received = topics.topic(device_id, kind)
        acls += [
            _acl("subscribeLiteral", received),
            _acl("publishClientReceive", received),
            # Unsubscribing is denied by default too; without this the agent's own clean-up
            # of its subscription would be refused.
            _acl("unsubscribeLiteral", received),
        ]
    return acls
