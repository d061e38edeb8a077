"""agent.toml, EDGE_AGENT_* variables and credentials: what is read, and what is refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edge_agent.config import (
    ConfigError,
    Credentials,
    load_config,
    save_credentials,
    save_settings,
)
from protocol.signing import generate_keypair, key_id, load_public_key


def test_defaults_without_any_file(tmp_path: Path) -> None:
    config = load_config(tmp_path, {})
    assert config.credentials is None
    assert config.keys == ()
    assert (config.settings.api_host, config.settings.api_port) == ("127.0.0.1", 8765)
    assert config.mqtt_address is None


def test_the_file_is_read_and_variables_override_it(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path / "keys")
    save_settings(
        tmp_path,
        {
            "mqtt_url": "mqtt://broker.local:1884",
            "api_port": 9000,
            "trusted_keys": ["keys/signing.pub"],
            "telemetry_interval_s": 30,
            "download_patience_s": 60,
        },
    )
    environ = {
        "EDGE_AGENT_API_PORT": "9100",
        "EDGE_AGENT_THREADS": "2",
        "EDGE_AGENT_DOWNLOAD_PATIENCE_S": "90.5",
    }
    config = load_config(tmp_path, environ)
    assert config.settings.api_port == 9100
    assert config.settings.threads == 2
    assert config.settings.telemetry_interval_s == 30.0
    assert config.settings.download_patience_s == 90.5
    assert config.mqtt_address == ("broker.local", 1884)
    assert [k.keyid for k in config.keys] == [key_id(load_public_key(public).raw)]


@pytest.mark.parametrize(
    ("toml", "environ", "message"),
    [
        ("api_prot = 1\n", {}, "unknown key(s) api_prot"),
        ("api_port = 'x'\n", {}, "api_port: 'x' is not valid"),
        ("", {"EDGE_AGENT_API_PORT": "70000"}, "api_port 70000 is not a TCP port"),
        ("", {"EDGE_AGENT_THREADS": "0"}, "threads must be at least 1"),
        ("", {"EDGE_AGENT_MQTT_URL": "tcp://x:1"}, "must look like mqtt://host:port"),
        ("", {"EDGE_AGENT_TELEMETRY_INTERVAL_S": "-1"}, "must be positive"),
        ("", {"EDGE_AGENT_TELEMETRY_INTERVAL_S": "nan"}, "must be positive"),
        ("download_patience_s = -5\n", {}, "download_patience_s must be a number of seconds"),
        ("", {"EDGE_AGENT_DOWNLOAD_PATIENCE_S": "inf"}, "download_patience_s must be"),
        ("", {"EDGE_AGENT_DOWNLOAD_PATIENCE_S": "soon"}, "download_patience_s: 'soon'"),
        ("download_patience_s = true\n", {}, "download_patience_s: True is not valid"),
        ("", {"EDGE_AGENT_TRUSTED_KEYS": "missing.pub"}, "trusted_keys:"),
        ("api_port = [\n", {}, "agent.toml"),
    ],
)
def test_bad_configuration_is_refused_with_the_key_named(
    tmp_path: Path, toml: str, environ: dict[str, str], message: str
) -> None:
    (tmp_path / "agent.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(tmp_path, environ)


def test_credentials_are_private_and_read_back(tmp_path: Path) -> None:
    save_credentials(tmp_path, Credentials("dev-1", "s3cret"))
    path = tmp_path / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config(tmp_path, {}).credentials == Credentials("dev-1", "s3cret")


def test_unreadable_credentials_say_to_enrol_again(tmp_path: Path) -> None:
    (tmp_path / "credentials.json").write_text("{not json")
    with pytest.raises(ConfigError, match="enrol again"):
        load_config(tmp_path, {})
