"""`make demo`, the README's first command, as a user runs it: the whole story end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_rolls_out_the_good_model_and_rolls_back_the_broken_one(
    reference_models: dict[str, Path], mosquitto_executable: str, tmp_path: Path
) -> None:
    out = tmp_path / "demo-out"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "demo.run"),
            *("--out", str(out), "--models-dir", str(reference_models["digits"].parent)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("== Summary") :]
    rollouts = re.findall(r"^\s+(\d+)\s+(\d\.\d\.\d)\s+(\d)\s+(\w+)", summary, re.MULTILINE)
    assert [(version, state) for _, version, _, state in rollouts] == [
        ("1.0.0", "completed"),
        ("2.0.0", "completed"),
        ("3.0.0", "rolled_back"),
    ]
    devices = re.findall(r"^\s+(cam-\d)\s+(\S+)\s+(\S+)", summary, re.MULTILINE)
    assert len(devices) == 5
    assert {serving for _, _, serving in devices} == {"2.0.0"}
    assert "accuracy_drop" in result.stdout
    assert "the web console: http://127.0.0.1:" in result.stdout
    # It cleaned up: no agent, server or broker from it is left running.
    leftover = subprocess.run(
        ["pgrep", "-f", str(out)], capture_output=True, text=True, check=False
    )
    assert leftover.stdout.strip() == ""
