"""The agent's configuration: `STATE_DIR/agent.toml`, overridden by `EDGE_AGENT_*` variables.

Every key in agent.toml has a variable of the same name in capitals (`api_port` is
`EDGE_AGENT_API_PORT`). The device's identity lives apart, in `credentials.json` (mode
0600), written by `edge-agent enroll`. Trusted publisher keys are pinned here, as paths
to the `.pub` files `edge-convert keygen` writes (relative paths are under the state
dir): a model is installed only if one of them signed its manifest.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.files import write_atomic
from protocol.mqtt import DEFAULT_PORT
from protocol.signing import SigningKeyError, TrustedKey, load_public_key
from protocol.topics import DEFAULT_PREFIX

CONFIG_FILE = "agent.toml"
CREDENTIALS_FILE = "credentials.json"
ENV_PREFIX = "EDGE_AGENT_"
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class Settings:
    """What agent.toml and the environment may set."""

    server_url: str | None = None  # the fleet server, for downloads: http(s)://host:port
    mqtt_url: str | None = None  # mqtt://host:port
    topic_prefix: str = DEFAULT_PREFIX
    trusted_keys: tuple[str, ...] = ()
    api_host: str = "127.0.0.1"
    api_port: int = 8765
    threads: int | None = None  # interpreter threads; None lets the runtime choose
    runtime: str | None = None  # force ai-edge-litert, tflite-runtime or tensorflow
    telemetry_interval_s: float = 60.0
    outbox_max_items: int = 10_000
    max_artifact_bytes: int = 512 * 1024 * 1024
    # How long a cut-off download is tried again (with growing waits) before the update
    # fails: long enough to ride out a server restart or a network outage.
    download_patience_s: float = 300.0
    keepalive_s: int = 30


@dataclass(frozen=True)
class Credentials:
    device_id: str
    secret: str


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    settings: Settings
    credentials: Credentials | None
    keys: tuple[TrustedKey, ...]

    @property
    def mqtt_address(self) -> tuple[str, int] | None:
        if not self.settings.mqtt_url:
            return None
        parts = urlsplit(self.settings.mqtt_url)
        return parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT


def load_config(state_dir: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = state_dir / CONFIG_FILE
    if path.exists():
        try:
            values.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    known = {f.name: f for f in fields(Settings)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    for name in known:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    settings = Settings(**{name: _coerce(name, value) for name, value in values.items()})
    _check(settings)
    keys = tuple(_load_key(state_dir, entry) for entry in settings.trusted_keys)
    return AgentConfig(state_dir, settings, load_credentials(state_dir), keys)


def _coerce(name: str, value: Any) -> Any:
    """Values from the environment are strings; from TOML they are typed. Both end typed."""
    default = getattr(Settings(), name)
    try:
        if name == "trusted_keys":
            items = value.split(os.pathsep) if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError("expected a list of paths")
            return tuple(i for i in items if i)
        if value == "" and default is None:
            return None
        if name in ("api_port", "outbox_max_items", "max_artifact_bytes", "keepalive_s"):
            return _integer(value)
        if name == "threads":
            return None if value is None else _integer(value)
        if name in ("telemetry_interval_s", "download_patience_s"):
            return _number(value)
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {value!r} is not valid ({exc})") from None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
    return int(value)


def _check(settings: Settings) -> None:
    if settings.mqtt_url and urlsplit(settings.mqtt_url).scheme != "mqtt":
        raise ConfigError(f"mqtt_url {settings.mqtt_url!r} must look like mqtt://host:port")
    if settings.server_url and urlsplit(settings.server_url).scheme not in ("http", "https"):
        raise ConfigError(f"server_url {settings.server_url!r} must be an http(s) URL")
    if not 0 <= settings.api_port <= 65535:
        raise ConfigError(f"api_port {settings.api_port} is not a TCP port")
    if settings.threads is not None and settings.threads < 1:
        raise ConfigError("threads must be at least 1")
    if not settings.telemetry_interval_s > 0:
        raise ConfigError("telemetry_interval_s must be positive")
    if not 0 <= settings.download_patience_s < math.inf:
        raise ConfigError("download_patience_s must be a number of seconds, 0 or more")
    if settings.outbox_max_items < 1 or settings.max_artifact_bytes < 1:
        raise ConfigError("outbox_max_items and max_artifact_bytes must be positive")


def _load_key(state_dir: Path, entry: str) -> TrustedKey:
    path = Path(entry)
    path = path if path.is_absolute() else state_dir / path
    try:
        return load_public_key(path)
    except SigningKeyError as exc:
        raise ConfigError(f"trusted_keys: {exc}") from None


def load_credentials(state_dir: Path) -> Credentials | None:
    path = state_dir / CREDENTIALS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Credentials(str(data["device_id"]), str(data["secret"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); enrol again") from None


def save_credentials(state_dir: Path, credentials: Credentials) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    data = {"device_id": credentials.device_id, "secret": credentials.secret}
    write_atomic(state_dir / CREDENTIALS_FILE, json.dumps(data).encode(), mode=0o600)


def save_settings(state_dir: Path, updates: Mapping[str, Any]) -> None:
    """Merge `updates` into agent.toml (only simple scalars and lists of strings)."""
    path = state_dir / CONFIG_FILE
    current: dict[str, Any] = {}
    if path.exists():
        current = tomllib.loads(path.read_text(encoding="utf-8"))
    current.update(updates)
    lines = [f"{key} = {_toml_value(value)}" for key, value in current.items() if value is not None]
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")
