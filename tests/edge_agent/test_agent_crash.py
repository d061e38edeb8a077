"""Power cuts during an update: the agent is SIGKILLed at every step, before the step's
work and after it, and restarted. Every time it must come back serving the old model or
the new one, never a broken one, and finish the update."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from edge_agent.update.machine import FAULT_ENV
from protocol.manifest import semver_key
from tests.bundles import DigitsBundles
from tests.fleet import AgentProcess, Fleet, agent_serving, eventually, running_fleet

pytestmark = pytest.mark.slow

STEPS = ("downloading", "verifying", "installing", "self_testing", "switching")
FAULTS = [f"{step}:{when}" for step in STEPS for when in ("before", "after")]


def test_a_kill_at_any_step_ends_on_the_old_or_the_new_model(
    tmp_path: Path, mosquitto_executable: str, digits: DigitsBundles
) -> None:
    data = np.load(digits.eval_npz)
    inputs, label = data["x"][:20], data["y"][:20]
    with running_fleet(tmp_path, mosquitto_executable) as fleet:
        for bundle in (digits.v1, digits.v2, digits.v3):
            fleet.upload(bundle.folder, bundle.public_key)
        state_dir, key = tmp_path / "agent", digits.v1.public_key
        device_id, agent = agent_serving(fleet, state_dir, key, "digits", "1.0.0")
        # Three versions in turn: the target is never the one serving nor the previous
        # one (kept in the other slot, it would be switched to without a download).
        versions = ["1.0.0", "2.0.0", "3.0.0"]
        try:
            for n, fault in enumerate(FAULTS):
                current, target = versions[n % 3], versions[(n + 1) % 3]
                _crash_and_recover(fleet, agent, device_id, fault, current, target)
                _answers_correctly(agent, inputs, label, target)
        finally:
            agent.stop()


def _crash_and_recover(
    fleet: Fleet, agent: AgentProcess, device_id: str, fault: str, old: str, new: str
) -> None:
    agent.stop()
    agent.start(**{FAULT_ENV: fault})
    downgrade = semver_key(new) < semver_key(old)
    desired = fleet.desire(device_id, "digits", new, rollback=downgrade)
    assert agent.wait_exit() == -signal.SIGKILL, f"{fault}: the agent did not die"
    # Nothing runs now: what is on disk must be a model that serves.
    assert agent.status()["model"] in (f"digits {old}", f"digits {new}"), fault
    agent.start()
    assert agent.serving() in (old, new), fault  # from the first answer on
    eventually(lambda: agent.serving() == new)

    def finished() -> bool:
        states = [s for seq, s, _, _ in fleet.reports(device_id) if seq == desired["seq"]]
        return "active" in states

    eventually(finished)
    assert agent.status()["update_state"] == "active", fault


def _answers_correctly(
    agent: AgentProcess, inputs: np.ndarray, labels: np.ndarray, version: str
) -> None:
    right = 0
    for x, y in zip(inputs, labels, strict=True):
        answer = agent.predict(x.tolist()).json()
        assert answer["model"]["version"] == version
        right += answer["top1"] == int(y)
    assert right >= 18  # the digits model is ~98% accurate
