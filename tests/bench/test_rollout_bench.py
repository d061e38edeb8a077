"""The rollout benchmark's machinery on a handful of simulated devices and the real digits
model: every device must end active on its wave's deployment, counted as such. Nothing here
judges speed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bench import rollout

pytestmark = pytest.mark.slow

DEVICES = 5


def test_the_rollout_benchmark_reaches_every_device(
    reference_models: dict[str, Path], mosquitto_executable: str
) -> None:
    figures = rollout.measure(reference_models["digits"].parent, sizes=(DEVICES,))
    assert figures.artifact_bytes > 0
    [run] = figures.runs
    assert run.devices == DEVICES
    assert (run.state, run.problems, run.all_active) == ("completed", (), True)
    assert len(run.wave_sizes) == len(rollout.WAVES)
    assert sum(run.wave_sizes) == DEVICES
    assert run.downloads == DEVICES
    assert len(run.wave_s) == len(rollout.WAVES)
    assert min(run.total_s, *run.wave_s, run.enrol_s, run.connect_s) > 0
    assert run.last_active_s is not None
    assert run.last_active_s > 0
    assert run.cpu_s > 0
    assert run.cpu_percent > 0
    assert 0 < run.rss_bytes <= run.peak_rss_bytes
    assert run.devices_cpu_s > 0

    lines = rollout.markdown(figures)
    assert lines[0] == "## Rollouts: three waves to every device"
    row = next(line for line in lines if line.startswith(f"| {DEVICES} | "))
    assert row.endswith("| yes |")
    assert f"Measured on {figures.machine}." in lines

    # A device that ended elsewhere turns the row to "no" and is named under the table.
    failed = dataclasses.replace(run, problems=("dev-1: last reported failed for x",))
    lines = rollout.markdown(dataclasses.replace(figures, runs=(failed,)))
    assert next(line for line in lines if line.startswith(f"| {DEVICES} | ")).endswith("| no |")
    assert any("NOT all active: dev-1: last reported failed" in line for line in lines)


def test_a_device_is_active_only_on_its_own_deployment() -> None:
    def outcome(**changes: object) -> rollout.DeviceOutcome:
        good = rollout.DeviceOutcome(
            "dev-1", 1, 1, 6, 0, "active", "rollout-1-wave-0-active", 1.0, ()
        )
        return dataclasses.replace(good, **changes)  # type: ignore[arg-type]

    member = ("dev-1", "active", "rollout-1-wave-0-active", 1)
    assert rollout.check_outcomes([outcome()], [member]) == []
    assert rollout.check_outcomes([outcome(deployment_id="rollout-1-wave-1-active")], [member])
    assert rollout.check_outcomes([outcome(downloads=0)], [member])
    assert rollout.check_outcomes([outcome(unacked=1)], [member])
    assert rollout.check_outcomes([outcome()], [(*member[:3], 2)])
    assert rollout.check_outcomes([outcome()], [("dev-1", "installing", *member[2:])])
    assert rollout.check_outcomes([outcome()], [])


def test_waves_are_timed_from_one_gates_passed_to_the_next() -> None:
    events = [
        {"ts": "2026-01-01T00:00:00", "kind": "created", "wave": 0},
        {"ts": "2026-01-01T00:00:01", "kind": "wave_started", "wave": 0},
        {"ts": "2026-01-01T00:00:02", "kind": "gates_passed", "wave": 0},
        {"ts": "2026-01-01T00:00:03.500", "kind": "wave_started", "wave": 1},
        {"ts": "2026-01-01T00:00:05", "kind": "gates_passed", "wave": 1},
    ]
    assert rollout.wave_seconds(events, 3) == (2.0, 3.0)
