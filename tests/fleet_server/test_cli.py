"""`fleet-server` as an operator runs it: real processes, one data dir, one database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from fleet_server.cli import cli
from tests.fleet import running_fleet
from tests.fleet_server.device_client import DeviceClient


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "fleet-data"


def test_bad_arguments_are_refused(data_dir: Path) -> None:
    result = run("enrollment", "create", "--data-dir", str(data_dir), "--expires", "3x")
    assert result.exit_code == 2
    assert "use a number and a unit" in result.output
    result = run("token", "create", "--data-dir", str(data_dir), "--role", "root")
    assert result.exit_code == 2
    result = run("enrollment", "create", "--data-dir", str(data_dir), "--tags", "bad tag")
    assert result.exit_code == 2
    assert "invalid tag" in result.output


def test_tokens_are_listed_and_revoked_by_id(data_dir: Path) -> None:
    from fleet_server.app import build_state
    from fleet_server.services.tokens import authenticate
    from fleet_server.settings import Settings

    where = ("--data-dir", str(data_dir))
    kept = run("token", "create", *where, "--role", "viewer", "--name", "dashboard").output
    leaving = run("token", "create", *where, "--role", "operator", "--name", "ci").output
    listed = run("token", "list", *where).output.splitlines()
    assert [line.split()[:3] for line in listed] == [
        ["1", "viewer", "dashboard"],
        ["2", "operator", "ci"],
    ]
    assert all(line.endswith("active") for line in listed)

    revoked = run("token", "revoke", *where, "2")
    assert revoked.exit_code == 0, revoked.output
    assert revoked.output.strip() == "revoked token 2 (operator ci)"
    assert "revoked 20" in run("token", "list", *where).output.splitlines()[1]
    state = build_state(Settings(data_dir=data_dir))
    with state.sessions() as session:
        assert authenticate(session, leaving.strip()) is None
        assert authenticate(session, kept.strip()) is not None

    unknown = run("token", "revoke", *where, "99")
    assert unknown.exit_code == 2
    assert "no API token with id 99" in unknown.output


def test_broker_config_refuses_to_overwrite(data_dir: Path) -> None:
    assert run("broker-config", "--data-dir", str(data_dir), "--port", "18830").exit_code == 0
    conf = (data_dir / "broker" / "mosquitto.conf").read_text()
    assert "listener 18830 127.0.0.1" in conf
    again = run("broker-config", "--data-dir", str(data_dir))
    assert again.exit_code == 2
    assert (data_dir / "broker" / "mosquitto.conf").read_text() == conf


@pytest.fixture
def served(data_dir: Path, mosquitto_executable: str) -> Iterator[tuple[str, dict[str, str]]]:
    """broker-config, the broker it describes, and `fleet-server serve` as a real process;
    every command finds the data dir through EDGEFLEET_DATA_DIR."""
    with running_fleet(data_dir.parent, mosquitto_executable) as fleet:
        assert fleet.data_dir == data_dir
        yield fleet.base, fleet.env


@pytest.mark.slow
def test_cli_made_tokens_work_against_the_served_api(
    served: tuple[str, dict[str, str]], data_dir: Path
) -> None:
    base, env = served
    token = run("token", "create", "--role", "operator", "--name", "ci", env=env)
    assert token.exit_code == 0, token.output
    headers = {"Authorization": f"Bearer {token.output.strip()}"}
    enrollment = run(
        "enrollment", "create", "--tags", "lab,cam", "--uses", "2", "--expires", "1h", env=env
    )
    assert enrollment.exit_code == 0, enrollment.output

    response = httpx.post(f"{base}/api/v1/enroll", json={"token": enrollment.output.strip()})
    assert response.status_code == 201, response.text
    device = response.json()
    assert device["mqtt"]["port"] is not None
    listed = httpx.get(f"{base}/api/v1/devices?tag=cam", headers=headers).json()
    assert [d["id"] for d in listed["items"]] == [device["device_id"]]

    # The served server provisioned the device on the broker it was told about.
    client = DeviceClient(
        "127.0.0.1", device["mqtt"]["port"], device["device_id"], device["secret"]
    )
    assert client.connect(), client.connect_reason
    client.close()
    audit = httpx.get(f"{base}/api/v1/audit", headers=headers)
    assert audit.status_code == 403  # operators act; admins read the audit log
