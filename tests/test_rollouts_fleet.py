"""Staged rollouts end to end: Mosquitto, `fleet-server serve` and several `edge-agent run`
processes on real digits bundles, with simulated traffic and ground-truth feedback."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from demo.loadgen import LoadGenerator
from protocol.manifest import MANIFEST_FILE, ArrayData, manifest_to_json, read_manifest
from protocol.signing import load_private_key, sign_manifest
from tests.bundles import Bundle, DigitsBundles, convert
from tests.fleet import AgentProcess, Fleet, eventually, lab_serving, running_fleet

pytestmark = pytest.mark.slow

ROLLOUT_WAIT = 120.0


class Demo:
    def __init__(self, fleet: Fleet, agents: dict[str, AgentProcess], load: LoadGenerator):
        self.fleet, self.agents, self.load = fleet, agents, load
        self.token = fleet.admin["Authorization"].removeprefix("Bearer ")

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
            fleet.upload(bundle.folder, bundle.public_key)
        agents = lab_serving(fleet, tmp_path, digits.v1.public_key, 3, "digits", "1.0.0")
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


def failing_self_test(digits: DigitsBundles, root: Path) -> Bundle:
    """digits 5.0.0: the int8 model, with self-test vectors no device reproduces, signed."""
    folder = root / "self-test-fails"
    shutil.copytree(digits.v2.folder, folder)
    manifest = read_manifest(folder).manifest
    test = manifest.self_test
    assert test is not None
    wrong = tuple(
        dataclasses.replace(
            v, expected=tuple(ArrayData.from_array(1 - e.to_array()) for e in v.expected)
        )
        for v in test.vectors
    )
    changed = dataclasses.replace(
        manifest, version="5.0.0", self_test=dataclasses.replace(test, vectors=wrong)
    )
    signed = sign_manifest(changed, load_private_key(digits.v2.private_key))
    (folder / MANIFEST_FILE).write_bytes(manifest_to_json(signed))
    return Bundle(folder, digits.v2.public_key, digits.v2.private_key)


def test_a_model_failing_its_self_test_is_stopped_in_the_first_wave(
    demo: Demo, digits: DigitsBundles, tmp_path: Path
) -> None:
    failing = failing_self_test(digits, tmp_path)
    demo.fleet.upload(failing.folder, failing.public_key)
    created = demo.create(
        model="digits",
        version="5.0.0",
        target={"tags": ["lab"]},
        # A long bake: a failed install is final and must not wait for it.
        waves=[{"count": 1, "bake_s": 600}, {"percent": 100, "bake_s": 2}],
        gates=GATES,
        on_failure="pause",
    )

    done = demo.settled(created["id"], "completed", "rolled_back", "paused")

    assert done["state"] == "paused"
    assert "install_failure_ratio fail" in done["reason"]
    [failed] = [d for d in done["devices"] if d["wave"] == 0]
    assert failed["state"] == "failed"
    assert "self-test" in failed["reason"]
    assert {d["state"] for d in done["devices"] if d["wave"] == 1} == {"pending"}
    assert set(demo.serving().values()) == {"1.0.0"}


def test_a_shadow_first_wave_is_blocked_by_low_agreement(demo: Demo) -> None:
    created = demo.create(
        model="digits",
        version="4.0.0",
        target={"tags": ["lab"]},
        waves=[{"percent": 100, "bake_s": 2, "shadow_first": True}],
        gates={**GATES, "min_shadow_agreement": 0.9, "min_compared": 50},
    )

    done = demo.settled(created["id"], "completed", "rolled_back", "paused")

    assert done["state"] == "rolled_back"
    assert "shadow_agreement fail" in done["reason"]
    kinds = [e["kind"] for e in done["events"]]
    assert "wave_switched" not in kinds  # no device ever answered with the candidate
    # Every device ran it in shadow only, and stays on (or returns to) the active model.
    assert set(demo.serving().values()) == {"1.0.0"}


def test_pause_and_resume(demo: Demo) -> None:
    created = demo.create(
        model="digits",
        version="2.0.0",
        target={"tags": ["lab"]},
        waves=[{"count": 1, "bake_s": 2, "pause_after": True}, {"percent": 100, "bake_s": 2}],
        gates=GATES,
    )
    rollout_id = created["id"]
    waiting = demo.settled(rollout_id, "paused", "completed", "rolled_back")
    assert waiting["state"] == "paused"
    assert "waiting for a person" in waiting["reason"]
    assert [w["status"] for w in waiting["waves"]] == ["done", "waiting"]
    assert sorted(str(v) for v in demo.serving().values()) == ["1.0.0", "1.0.0", "2.0.0"]

    result = demo.fleet.cli(
        "rollout", "--server", demo.fleet.base, "--token", demo.token, "resume", str(rollout_id)
    )
    assert result == f"rollout {rollout_id}: running"
    pause = httpx.post(
        f"{demo.fleet.base}/api/v1/rollouts/{rollout_id}/pause", headers=demo.fleet.admin
    )
    assert pause.status_code == 200, pause.text
    again = httpx.post(
        f"{demo.fleet.base}/api/v1/rollouts/{rollout_id}/pause", headers=demo.fleet.admin
    )
    assert again.status_code == 409
    assert demo.show(rollout_id)["reason"].startswith("paused by")
    resumed = httpx.post(
        f"{demo.fleet.base}/api/v1/rollouts/{rollout_id}/resume", headers=demo.fleet.admin
    )
    assert resumed.status_code == 200, resumed.text

    done = demo.settled(rollout_id, "completed", "rolled_back")
    assert done["state"] == "completed"
    assert set(demo.serving().values()) == {"2.0.0"}
    kinds = [e["kind"] for e in done["events"]]
    assert kinds.count("paused") == 2
    assert kinds.count("resumed") == 2


def test_a_server_killed_mid_rollout_carries_on_after_a_restart(demo: Demo) -> None:
    created = demo.create(
        model="digits",
        version="2.0.0",
        target={"tags": ["lab"]},
        waves=[{"count": 1, "bake_s": 3}, {"percent": 100, "bake_s": 3}],
        gates=GATES,
    )
    rollout_id = created["id"]

    def first_wave_under_way() -> bool:
        return bool(demo.show(rollout_id)["waves"][0]["status"] == "under_way")

    eventually(first_wave_under_way, timeout=ROLLOUT_WAIT)
    demo.fleet.kill_server()
    demo.fleet.start_server()

    done = demo.settled(rollout_id, "completed", "rolled_back", "paused")
    assert done["state"] == "completed", done["reason"]
    assert set(demo.serving().values()) == {"2.0.0"}
    kinds = [e["kind"] for e in done["events"]]
    assert kinds.count("wave_started") == 2  # the restart started nothing twice


def test_an_agent_offline_during_its_wave_catches_up_when_it_returns(demo: Demo) -> None:
    created = demo.create(
        model="digits",
        version="2.0.0",
        target={"tags": ["lab"]},
        waves=[{"percent": 100, "bake_s": 2}],
        gates={**GATES, "max_install_failure_ratio": 0.5, "min_devices": 2},
    )
    rollout_id = created["id"]
    away_id, away = next(iter(demo.agents.items()))
    away.stop()  # a clean stop: the broker hears `offline` from it
    try:
        # The others install; the wave waits for the one that is away (its timeout is far).
        def others_active() -> bool:
            states = {d["device_id"]: d["state"] for d in demo.show(rollout_id)["devices"]}
            return all(s == "active" for d, s in states.items() if d != away_id)

        eventually(others_active, timeout=ROLLOUT_WAIT)
        assert demo.show(rollout_id)["state"] == "running"
    finally:
        away.start()

    done = demo.settled(rollout_id, "completed", "rolled_back", "paused")
    assert done["state"] == "completed", done["reason"]
    assert set(demo.serving().values()) == {"2.0.0"}
