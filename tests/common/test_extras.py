"""Which extra a program needs, read from the package's own requirements."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.extras import missing_for
from tests.venvs import CLEAN_ENV, install_fresh

REPO = Path(__file__).resolve().parents[2]
# What setup.cfg packages.
SHIPPED = ("protocol", "common", "toolchain", "edge_agent", "fleet_server")
REQUIRES = [
    "numpy>=1.23",
    'tensorflow>=2.16; extra == "convert"',
    'rich>=13; extra == "convert"',
    "psycopg[binary]>=3.1; extra == 'server'",
    'fastapi>=0.115; extra == "server"',
    'paho-mqtt>=2.0; extra == "server"',
    'paho-mqtt>=2.0; extra == "agent"',
]


@pytest.mark.parametrize(
    ("extra", "installed", "expected"),
    [
        ("convert", set(), ["tensorflow", "rich"]),
        ("convert", {"tensorflow"}, ["rich"]),
        ("convert", {"tensorflow", "rich"}, []),
        ("server", {"fastapi"}, ["psycopg", "paho-mqtt"]),
        ("agent", {"paho-mqtt"}, []),
        ("nothing", set(), []),
    ],
)
def test_missing_names_what_the_extra_adds_and_is_absent(
    extra: str, installed: set[str], expected: list[str]
) -> None:
    assert missing_for(extra, REQUIRES, installed.__contains__) == expected


@pytest.mark.slow
def test_programs_installed_without_their_extra_say_which_to_install(tmp_path: Path) -> None:
    """`pip install edgefleet` (no extra) in a fresh venv: each program says in one line
    what to install, and exits 2."""
    source = tmp_path / "source"  # a copy: setuptools builds in the tree it is given
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, source / name)
    for package in SHIPPED:
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = tmp_path / "dist"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "-w", built, source),
        ],
        check=True,
        env=CLEAN_ENV,
        capture_output=True,
    )
    (wheel,) = built.glob("edgefleet-*.whl")
    bin_dir = install_fresh(tmp_path, wheel)
    for program, extra in (("edge-convert", "convert"), ("fleet-server", "server")):
        result = subprocess.run(
            [bin_dir / program, "--help"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=CLEAN_ENV,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith(f"{program}: error: needs the '{extra}' extra (")
        assert line.endswith(f"pip install 'edgefleet[{extra}]'")
