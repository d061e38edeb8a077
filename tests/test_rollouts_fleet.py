"""Staged rollouts end to end: Mosquitto, `fleet-server serve` and several `edge-agent run`
processes on real digits bundles, with simulated traffic and ground-truth feedback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from demo.loadgen import LoadGenerator
from tests.bundles import Bundle, DigitsBundles, convert
from tests.fleet import AgentProcess, Fleet, enroll_agent, eventually, running_fleet

pytestmark = pytest.mark.slow

FAST_TELEMETRY = {"EDGE_AGENT_TELEMETRY_INTERVAL_S": "0.5"}
ROLLOUT_WAIT = 120.0


class Demo:
    def __init__(self, fleet: Fleet, agents: dict[str, AgentProcess], load: LoadGenerator):
        self.fleet, self.agents, self.load = fleet, agents, load

    def create(self, **body: Any) -> dict[str, Any]:
        response = httpx.post(
            f"{self.fleet.base}/api/v1/rollouts", json=body, headers=self.fleet.admin
        )
        assert response.status_code == 201, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def show(self, rollout_id: int) -> dict[str, Any]:
        response = httpx.get(
            f"{self.fleet.base}/api/v1/rollouts/{rollout_id}", headers=self.fleet.admin
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def settled(self, rollout_id: int, *states: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            shown = self.show(rollout_id)
            return shown if shown["state"] in states else None

        found: dict[str, Any] = eventually(check, timeout=ROLLOUT_WAIT, every=0.5)
        return found

    def serving(self) -> dict[str, str | None]:
        return {device: agent.serving() for device, agent in self.agents.items()}

    def labelled(self, version: str) -> int:
        rows = self.fleet.sql(
            "SELECT COALESCE(SUM(labelled), 0) FROM accuracy_windows WHERE model_version = :v",
            v=version,
        )
        return int(rows[0][0])


@pytest.fixture(scope="module")
def broken(digits: DigitsBundles, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """digits 4.0.0, trained on shuffled labels and signed by the same publisher: it passes
    conversion and its self-test, and only its accuracy in the field gives it away."""
    from models import digits as recipe

    root = tmp_path_factory.mktemp("broken-digits")
    recipe.train(root / "model", seed=0, shuffled_labels=True)
    folder = root / "model"
    return convert(
        folder,
        root / "bundle",
        "digits",
        "4.0.0",
        digits.v1.private_key,
        digits.v1.public_key,
        *("--labels", folder / "labels.txt", "--calibration", folder / "calibration.npz"),
        *("--eval", folder / "eval.npz"),
    )


@pytest.fixture
def demo(
    tmp_path: Path, mosquitto_executable: str, digits: DigitsBundles, broken: Bundle
) -> Iterator[Demo]:
    data = np.load(digits.eval_npz)
    with running_fleet(tmp_path, mosquitto_executable) as fleet:
        for bundle in (digits.v1, digits.v2, broken):
            fleet.upload(bundle)
        agents: dict[str, AgentProcess] = {}
        for i in range(3):
            device_id, agent = enroll_agent(
                fleet, tmp_path / f"agent-{i}", digits.v1.public_key, tags="lab", **FAST_TELEMETRY
            )
            agent.start()
            fleet.desire(device_id, "digits", "1.0.0")
            agents[device_id] = agent
        eventually(lambda: all(a.serving() == "1.0.0" for a in agents.values()))
        load = LoadGenerator([a.api_port for a in agents.values()], data["x"], data["y"])
        load.start()
        demo = Demo(fleet, agents, load)
        try:
            # The previous model's accuracy on these devices is what the candidate is held to.
            eventually(lambda: demo.labelled("1.0.0") >= 150, timeout=ROLLOUT_WAIT)
            yield demo
        finally:
            load.stop()
            for agent in agents.values():
                agent.stop()


GATES = {
    "max_install_failure_ratio": 0.0,
    "max_error_rate": 0.01,
    "max_nan_outputs": 0,
    "max_accuracy_drop": 0.05,
    "min_devices": 1,
    "min_predictions": 20,
    "min_labelled": 20,
}


def test_a_good_model_is_promoted_through_every_wave(demo: Demo) -> None:
    created = demo.create(
        model="digits",
        version="2.0.0",
        target={"tags": ["lab"]},
        waves=[{"count": 1, "bake_s": 2}, {"percent": 100, "bake_s": 2}],
        gates=GATES,
    )
    assert [w["devices"] for w in created["waves"]] == [1, 2]

    done = demo.settled(created["id"], "completed", "rolled_back", "paused")

    assert done["state"] == "completed", done["reason"]
    assert set(demo.serving().values()) == {"2.0.0"}
    kinds = [e["kind"] for e in done["events"]]
    assert kinds.count("wave_started") == 2
    assert kinds.count("gates_passed") == 2
    assert kinds[-1] == "completed"
    passed = [e for e in done["events"] if e["kind"] == "gates_passed"]
    accuracy = next(g for g in passed[0]["details"]["gates"] if g["gate"] == "accuracy_drop")
    assert accuracy["verdict"] == "pass"
    assert accuracy["evidence"] >= 20
    assert {d["state"] for d in done["devices"]} == {"active"}


def test_a_model_with_lower_accuracy_is_rolled_back_by_the_accuracy_gate(demo: Demo) -> None:
    created = demo.create(
        model="digits",
        version="4.0.0",
        target={"tags": ["lab"]},
        waves=[{"count": 1, "bake_s": 2}, {"percent": 100, "bake_s": 2}],
        gates=GATES,
    )

    done = demo.settled(created["id"], "completed", "rolled_back", "paused")

    assert done["state"] == "rolled_back"
    assert "accuracy_drop fail" in done["reason"]
    first_wave = [d for d in done["devices"] if d["wave"] == 0]
    assert [d["state"] for d in first_wave] == ["reverted"]
    # The second wave never started: its devices were not touched.
    assert {d["state"] for d in done["devices"] if d["wave"] == 1} == {"pending"}
    eventually(lambda: set(demo.serving().values()) == {"1.0.0"}, timeout=ROLLOUT_WAIT)
