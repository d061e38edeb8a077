"""The systemd unit that runs the agent on a device."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "edge-agent.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_the_unit_runs_the_agent_unprivileged_and_restarts_it() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["User"] == "edge-agent"
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"].split()[0].endswith("/edge-agent")
    assert service["ExecStart"].split()[1:] == ["run"]
    assert service["ReadWritePaths"] == "/var/lib/edge-agent"
    assert "EDGE_AGENT_STATE_DIR=/var/lib/edge-agent" in service["Environment"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    # Pointed at this environment's edge-agent, so that the executable check passes.
    agent = Path(sys.executable).with_name("edge-agent")
    text = UNIT.read_text().replace("/opt/edge-agent/bin/edge-agent", str(agent))
    copy = tmp_path / "edge-agent.service"
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(copy)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr, result.stderr
