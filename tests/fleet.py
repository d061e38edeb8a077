"""A real fleet for end-to-end tests: Mosquitto configured by `broker-config`, `fleet-server
serve` and `edge-agent run` as processes of their own, talking over real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from fleet_server.cli import cli as fleet_cli
from fleet_server.mosquitto import Mosquitto, free_port
from tests.bundles import Bundle

WAIT = 60.0
AGENT = (sys.executable, "-m", "edge_agent.cli")


def eventually(check: Callable[[], Any], timeout: float = WAIT, every: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up after {timeout:g} s; last: {value!r}")


@dataclass
class Fleet:
    base: str
    data_dir: Path
    broker: Mosquitto
    server: subprocess.Popen[bytes]
    env: dict[str, str]
    admin: dict[str, str] = field(default_factory=dict)
    restart: Callable[[], subprocess.Popen[bytes]] | None = field(default=None, repr=False)

    def kill_server(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown of any kind."""
        self.server.kill()
        self.server.wait()

    def start_server(self) -> None:
        """The same `fleet-server serve` again, on the same port, database and broker."""
        assert self.restart is not None
        self.server = self.restart()
        eventually(lambda: _healthy(self), timeout=WAIT)

    def cli(self, *args: str) -> str:
        result = CliRunner().invoke(fleet_cli, list(args), env=self.env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output.strip()

    def enrollment(self, tags: str = "", uses: int = 1) -> str:
        args = ["enrollment", "create", "--uses", str(uses)]
        return self.cli(*args, *(["--tags", tags] if tags else []))

    def upload(self, bundle: Bundle) -> None:
        key = {"name": bundle.public_key.stem, "public_key": bundle.public_key.read_text()}
        response = httpx.post(f"{self.base}/api/v1/keys", json=key, headers=self.admin)
        assert response.status_code in (201, 409), response.text
        response = httpx.post(
            f"{self.base}/api/v1/models", files=bundle.files(), headers=self.admin
        )
        assert response.status_code in (201, 409), response.text

    def desire(
        self, device_id: str, name: str | None, version: str | None, **options: Any
    ) -> dict[str, Any]:
        body = {"name": name, "version": version, **options}
        url = f"{self.base}/api/v1/devices/{device_id}/desired"
        response = httpx.put(url, json=body, headers=self.admin)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def device(self, device_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.base}/api/v1/devices/{device_id}", headers=self.admin)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def sql(self, query: str, **params: Any) -> list[tuple[Any, ...]]:
        """Read the server's database directly (SQLite in the data dir)."""
        engine = create_engine(f"sqlite:///{self.data_dir / 'fleet.db'}")
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(query), params)]
        finally:
            engine.dispose()

    def reports(self, device_id: str) -> list[tuple[Any, ...]]:
        return self.sql(
            "SELECT desired_seq, state, model_version, reason FROM update_reports "
            "WHERE device_id = :d ORDER BY msg_id",
            d=device_id,
        )


@contextmanager
def running_fleet(root: Path, mosquitto_executable: str) -> Iterator[Fleet]:
    data_dir = root / "fleet-data"
    # The rollout controller steps often, so that waves move at the tests' pace.
    env = {"EDGEFLEET_DATA_DIR": str(data_dir), "EDGEFLEET_ROLLOUT_INTERVAL_S": "0.3"}
    mqtt_port = free_port()
    result = CliRunner().invoke(fleet_cli, ["broker-config", "--port", str(mqtt_port)], env=env)
    assert result.exit_code == 0, result.output
    broker = Mosquitto(data_dir / "broker", mosquitto_executable)
    broker.start()
    http_port = free_port()
    command = [
        *(sys.executable, "-m", "fleet_server.cli", "serve", "--port", str(http_port)),
        *("--mqtt-url", f"mqtt://127.0.0.1:{mqtt_port}"),
    ]
    server = _serve(command, env, root / "fleet-server.log")
    fleet = Fleet(f"http://127.0.0.1:{http_port}", data_dir, broker, server, env)
    fleet.restart = lambda: _serve(command, env, root / "fleet-server.log")
    try:
        eventually(lambda: _healthy(fleet), timeout=WAIT)
        token = fleet.cli("token", "create", "--role", "admin", "--name", "tests")
        fleet.admin = {"Authorization": f"Bearer {token}"}
        yield fleet
    finally:
        # fleet.server: a test may have killed the first and started another.
        fleet.server.send_signal(signal.SIGTERM)
        try:
            fleet.server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            fleet.server.kill()
        broker.kill()


def _serve(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


def _healthy(fleet: Fleet) -> bool:
    if fleet.server.poll() is not None:
        raise AssertionError(f"fleet-server exited with {fleet.server.returncode}")
    try:
        return bool(httpx.get(f"{fleet.base}/healthz", timeout=1).json()["mqtt"] == "connected")
    except httpx.HTTPError:
        return False


@dataclass
class AgentProcess:
    """`edge-agent run` on a state dir, started and killed like a service manager would."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    api_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, **env: str) -> None:
        # A restart keeps its port, as a service's configuration would.
        self.api_port = self.api_port or free_port()
        log = (self.state_dir.parent / f"{self.state_dir.name}.log").open("ab")
        self.process = subprocess.Popen(
            [
                *AGENT,
                "run",
                "--state-dir",
                str(self.state_dir),
                "--api-port",
                str(self.api_port),
            ],
            env={**os.environ, **self.env, **env},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        eventually(self._answers, timeout=WAIT)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"edge-agent exited with {self.process.returncode}: {self.log()}")
        try:
            return httpx.get(f"{self.base}/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_exit(self, timeout: float = WAIT) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def serving(self) -> str | None:
        """The version of the model answering, from /v1/health."""
        model = self.health().get("model")
        return str(model["version"]) if model else None

    def health(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.base}/v1/health", timeout=5).json()
        return answer

    def predict(self, inputs: Any) -> httpx.Response:
        return httpx.post(f"{self.base}/v1/predict", json={"inputs": inputs}, timeout=10)

    def status(self) -> dict[str, Any]:
        result = subprocess.run(
            [*AGENT, "status", "--json", "--state-dir", str(self.state_dir)],
            capture_output=True,
            check=True,
        )
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def log(self) -> str:
        path = self.state_dir.parent / f"{self.state_dir.name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def enroll_agent(
    fleet: Fleet, state_dir: Path, trusted_key: Path, tags: str = "", **env: str
) -> tuple[str, AgentProcess]:
    """`edge-agent enroll` as a process, with the publisher's key pinned."""
    token = fleet.enrollment(tags)
    result = subprocess.run(
        [
            *AGENT,
            "enroll",
            *("--server", fleet.base, "--token", token, "--state-dir", str(state_dir)),
            *("--trusted-key", str(trusted_key)),
            *(("--tags", tags) if tags else ()),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip(), AgentProcess(state_dir, env)


def agent_serving(
    fleet: Fleet, state_dir: Path, trusted_key: Path, name: str, version: str
) -> tuple[str, AgentProcess]:
    """An enrolled agent, running, and converged on `name` `version`."""
    device_id, agent = enroll_agent(fleet, state_dir, trusted_key)
    agent.start()
    fleet.desire(device_id, name, version)
    eventually(lambda: agent.serving() == version)
    return device_id, agent
