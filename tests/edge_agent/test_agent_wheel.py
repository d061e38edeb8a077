"""What a device installs: the wheel `make agent-wheel` builds, in a fresh virtual
environment with nothing but its own dependencies, runs the agent as lightly as the
source tree does, and brings no tool that cannot work on a device."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.bundles import DigitsBundles
from tests.edge_agent.test_agent_light import REPO, heavy, real_run, signed_update
from tests.venvs import install_fresh

pytestmark = pytest.mark.slow

SHIPPED = {"protocol", "common", "edge_agent"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built by the documented command."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        ["make", "-s", "agent-wheel", f"AGENT_WHEEL_DIR={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("edgefleet_agent-*-py3-none-any.whl")
    return built


@pytest.fixture(scope="module")
def device_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel in a fresh venv, with only its own dependencies."""
    return install_fresh(tmp_path_factory.mktemp("device"), wheel) / "python"


def test_the_wheel_holds_the_wire_contract_and_the_agent_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == SHIPPED
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert scripts.split() == ["[console_scripts]", "edge-agent", "=", "edge_agent.cli:main"]


def test_a_fresh_install_has_only_the_agent_s_dependencies(device_python: Path) -> None:
    listed = subprocess.run(
        [device_python, "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert {"edgefleet-agent", "ai-edge-litert", "numpy", "paho-mqtt", "cryptography"} <= installed
    assert not installed & {"tensorflow", "fastapi", "sqlalchemy", "pydantic", "rich", "httpx"}
    bin_dir = device_python.parent
    assert (bin_dir / "edge-agent").exists()
    assert not (bin_dir / "edge-convert").exists()
    assert not (bin_dir / "fleet-server").exists()
    help_text = subprocess.run(
        [bin_dir / "edge-agent", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "enroll" in help_text
    assert "run" in help_text


def test_the_installed_agent_serves_and_updates_without_anything_heavy(
    device_python: Path, digits: DigitsBundles, tmp_path: Path
) -> None:
    image = np.load(digits.eval_npz)["x"][0].tolist()
    away = tmp_path / "elsewhere"  # not the source tree: imports come from the venv
    away.mkdir()
    served = real_run(str(device_python), tmp_path / "run", digits.v1.folder, image, away)
    assert served["answer"]["model"]["version"] == "1.0.0"
    assert served["source"].startswith(str(device_python.parent.parent))
    assert heavy(served) == []
    updated = signed_update(str(device_python), tmp_path / "update", digits.v1, image, away)
    # The signature was checked by the child process, with the venv's own cryptography.
    assert updated["update"] == "active"
    assert updated["answer"]["model"]["version"] == "1.0.0"
    assert heavy(updated) == []
