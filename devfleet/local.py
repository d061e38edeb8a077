"""A fleet on this machine: a Mosquitto configured by `broker-config`, `fleet-server
serve` on SQLite and `edge-agent run` processes, each a process of its own on free
ports, under one folder.

What `make demo`, the benchmarks and the end-to-end tests start, so that all three run
the server exactly as an operator would, and none of them repeats how.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from devfleet.mosquitto import Mosquitto, MosquittoError, find_mosquitto, free_port
from devfleet.processes import stop_process
from fleet_server.cli import cli as fleet_cli
from fleet_server.mqtt.broker_config import BrokerCredentials, write_broker_config

START_TIMEOUT_S = 60.0
# free_port() cannot reserve the port: another process may take it before the broker binds.
BROKER_PORT_ATTEMPTS = 3


def start_broker(config_dir: Path, executable: str) -> tuple[Mosquitto, BrokerCredentials]:
    """A Mosquitto configured by `broker-config` in `config_dir`, started on a free port
    (another one if that is taken first); its server credentials."""
    for attempt in range(1, BROKER_PORT_ATTEMPTS + 1):
        credentials = write_broker_config(config_dir, port=free_port(), force=True)
        broker = Mosquitto(config_dir, executable)
        try:
            broker.start()
        except MosquittoError as error:
            if "Address already in use" not in str(error) or attempt == BROKER_PORT_ATTEMPTS:
                raise
        else:
            return broker, credentials
    raise AssertionError("unreachable")


@dataclass
class LocalFleet:
    root: Path
    env: dict[str, str]  # EDGEFLEET_* for the server and for `cli`
    http_port: int
    broker: Mosquitto
    server: subprocess.Popen[bytes] | None = None
    token: str = ""  # an admin API token

    @classmethod
    def start(
        cls, root: Path, *, rollout_interval_s: float = 5.0, executable: str | None = None
    ) -> Self:
        executable = executable or find_mosquitto()
        if executable is None:
            raise RuntimeError("mosquitto is not installed (`make mosquitto` installs it)")
        data_dir = root / "fleet-data"
        env = {
            "EDGEFLEET_DATA_DIR": str(data_dir),
            "EDGEFLEET_ROLLOUT_INTERVAL_S": str(rollout_interval_s),
        }
        broker, _ = start_broker(data_dir / "broker", executable)
        fleet = cls(root, env, free_port(), broker)
        try:
            fleet.start_server()
            fleet.token = fleet.cli("token", "create", "--role", "admin", "--name", "local")
        except BaseException:
            fleet.stop()
            raise
        return fleet

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def data_dir(self) -> Path:
        return Path(self.env["EDGEFLEET_DATA_DIR"])

    def start_server(self) -> None:
        """`fleet-server serve` (again, after a stop or a kill: same port, database, broker)."""
        with (self.root / "fleet-server.log").open("ab") as log:
            self.server = subprocess.Popen(
                [
                    *(sys.executable, "-m", "fleet_server.cli", "serve"),
                    *("--port", str(self.http_port)),
                    *("--mqtt-url", f"mqtt://{self.broker.host}:{self.broker.port}"),
                ],
                env={**os.environ, **self.env},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"fleet-server did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.1)

    def kill_server(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown of any kind."""
        assert self.server is not None
        self.server.kill()
        self.server.wait()

    def healthy(self) -> bool:
        """Up and connected to its broker; raises if the server has exited."""
        assert self.server is not None
        if self.server.poll() is not None:
            tail = (self.root / "fleet-server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"fleet-server exited with {self.server.returncode}:\n{tail}")
        try:
            return bool(httpx.get(f"{self.base}/healthz", timeout=1).json()["mqtt"] == "connected")
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        stop_process(self.server)
        self.broker.kill()

    def cli(self, *args: str) -> str:
        """`fleet-server ARGS` on this fleet's data, in this process; its output."""
        result = CliRunner().invoke(fleet_cli, list(args), env=self.env, catch_exceptions=False)
        if result.exit_code != 0:
            raise RuntimeError(f"fleet-server {' '.join(args[:2])} failed: {result.output}")
        return str(result.output).strip()

    def upload(self, bundle: Path, public_key: Path) -> None:
        """Trust the publisher's key (if it is new) and register the signed bundle."""
        key = {"name": public_key.stem, "public_key": public_key.read_text()}
        response = httpx.post(f"{self.base}/api/v1/keys", json=key, headers=self.admin)
        if response.status_code not in (201, 409):
            raise RuntimeError(f"POST /api/v1/keys: {response.status_code} {response.text}")
        files = {
            name: (name, (bundle / name).read_bytes()) for name in ("manifest.json", "model.tflite")
        }
        fields = {"manifest": files["manifest.json"], "model": files["model.tflite"]}
        response = httpx.post(
            f"{self.base}/api/v1/models", files=fields, headers=self.admin, timeout=60
        )
        if response.status_code not in (201, 409):
            raise RuntimeError(f"POST /api/v1/models: {response.status_code} {response.text}")

    def sql(self, query: str, **params: Any) -> list[tuple[Any, ...]]:
        """Read the server's SQLite database, read-only."""
        path = (self.data_dir / "fleet.db").resolve()
        engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(query), params)]
        finally:
            engine.dispose()


# What `edge-agent run` prints on stderr once its local API listens (edge_agent/cli.py).
_AGENT_SERVING = re.compile(rb"edge-agent serving on http://[^\s:]+:(\d+)")


@dataclass
class LocalAgent:
    """`edge-agent run` on a state dir, started and stopped as a service manager would.

    The first start asks for any free port (`--api-port 0`) and reads which one from the
    agent's "serving on" line. A port picked beforehand can be taken by another process
    before the agent binds it, and the agent would exit. A restart keeps its port, as a
    service's configuration would.
    """

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    api_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}.log"

    def start(self, **env: str) -> None:
        """Start, and return once the local API listens; raises RuntimeError (with the
        end of the agent's log) if the agent exits or is not up in START_TIMEOUT_S."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "edge_agent.cli", "run"),
                    *("--state-dir", str(self.state_dir), "--api-port", str(self.api_port)),
                ],
                env={**os.environ, **self.env, **env},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while (port := self._announced_port(offset)) is None:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"edge-agent exited with {self.process.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"edge-agent did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        self.api_port = port

    def _announced_port(self, offset: int) -> int | None:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            found = _AGENT_SERVING.search(log.read())
        return int(found[1]) if found else None

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL, as a power cut would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def health(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.base}/v1/health", timeout=5).json()
        return answer

    def serving(self) -> str | None:
        """The version of the model answering, from /v1/health; None when none is."""
        model = self.health().get("model")
        return str(model["version"]) if model else None

    def log(self) -> str:
        """The end of the agent's log (stderr, kept across restarts)."""
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
