"""A real fleet for end-to-end tests: Mosquitto configured by `broker-config`, `fleet-server
serve` and `edge-agent run` as processes of their own, talking over real sockets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from devfleet.local import LocalAgent, LocalFleet

WAIT = 60.0
FAST_TELEMETRY = {"EDGE_AGENT_TELEMETRY_INTERVAL_S": "0.5"}
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


class Fleet(LocalFleet):
    """A local fleet with what the tests ask of it."""

    def enrollment(self, tags: str = "", uses: int = 1) -> str:
        args = ["enrollment", "create", "--uses", str(uses)]
        return self.cli(*args, *(["--tags", tags] if tags else []))

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

    def reports(self, device_id: str) -> list[tuple[Any, ...]]:
        return self.sql(
            "SELECT desired_seq, state, model_version, reason FROM update_reports "
            "WHERE device_id = :d ORDER BY msg_id",
            d=device_id,
        )


@contextmanager
def running_fleet(root: Path, mosquitto_executable: str) -> Iterator[Fleet]:
    # The rollout controller steps often, so that waves move at the tests' pace.
    fleet = Fleet.start(root, rollout_interval_s=0.3, executable=mosquitto_executable)
    try:
        yield fleet
    finally:
        fleet.stop()


class AgentProcess(LocalAgent):
    """`edge-agent run` with what the tests ask of it."""

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


def lab_serving(
    fleet: Fleet, root: Path, trusted_key: Path, count: int, name: str, version: str
) -> dict[str, AgentProcess]:
    """`count` agents tagged `lab`, enrolled, running with telemetry every 0.5 s, and
    converged on `name` `version`; by device id."""
    agents: dict[str, AgentProcess] = {}
    for i in range(count):
        device_id, agent = enroll_agent(
            fleet, root / f"agent-{i}", trusted_key, tags="lab", **FAST_TELEMETRY
        )
        agent.start()
        fleet.desire(device_id, name, version)
        agents[device_id] = agent
    eventually(lambda: all(a.serving() == version for a in agents.values()))
    return agents
