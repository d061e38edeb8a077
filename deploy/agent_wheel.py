"""Build the package a device installs: `edgefleet-agent`, a wheel of the wire contract
(`protocol`), the lower layer it shares with the toolchain (`common`) and the agent
(`edge_agent`), with the `edge-agent` command and the agent's dependencies only.

    make agent-wheel                  # dist/edgefleet_agent-VERSION-py3-none-any.whl

The version and the dependencies are read from setup.cfg (`install_requires` and the
`agent` extra), so the device's package and `edgefleet[agent]` never disagree. The wheel
is built by pip with this environment's setuptools (no network) from a staging folder
that holds only those packages.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "common", "edge_agent")
NAME = "edgefleet-agent"
SUMMARY = "The edgefleet device agent: LiteRT inference, safe model updates, telemetry"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "{version}"
description = "{summary}"
readme = "README.md"
requires-python = "{python}"
license = "{license}"
dependencies = [{dependencies}]
classifiers = ["Operating System :: POSIX :: Linux", "Programming Language :: Python :: 3.11"]

[project.scripts]
edge-agent = "edge_agent.cli:main"

[tool.setuptools]
packages = [{packages}]
"""


def _requirements(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def agent_metadata(setup_cfg: Path) -> dict[str, str]:
    """Version, Python, licence and the agent's dependencies, as setup.cfg states them."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    base = _requirements(config["options"]["install_requires"])
    agent = _requirements(config["options.extras_require"]["agent"])
    dependencies = list(dict.fromkeys([*base, *agent]))
    return {
        "name": NAME,
        "version": config["metadata"]["version"],
        "summary": SUMMARY,
        "python": config["options"]["python_requires"],
        "license": config["metadata"]["license"],
        "dependencies": ", ".join(f'"{d}"' for d in dependencies),
    }


def find_packages(root: Path) -> list[str]:
    """The shipped packages and every subpackage of theirs, as dotted names."""
    found = []
    for top in PACKAGES:
        for init in sorted((root / top).rglob("__init__.py")):
            found.append(".".join(init.parent.relative_to(root).parts))
    return found


def stage(root: Path, staging: Path) -> None:
    """Copy the shipped packages into `staging` beside a pyproject.toml of their own."""
    for top in PACKAGES:
        shutil.copytree(
            root / top, staging / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    packages = ", ".join(f'"{p}"' for p in find_packages(root))
    text = PYPROJECT.format(packages=packages, **agent_metadata(root / "setup.cfg"))
    (staging / "pyproject.toml").write_text(text)
    (staging / "README.md").write_text(f"# {NAME}\n\n{SUMMARY}. See docs/agent.md.\n")


def build(out: Path) -> Path:
    """Build the wheel into `out`; its path."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-agent-") as tmp:
        staging = Path(tmp) / "src"
        staging.mkdir()
        stage(ROOT, staging)
        built = Path(tmp) / "dist"
        subprocess.run(
            # This environment's setuptools (the dev extra's): nothing is fetched.
            [
                *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
                *("--no-build-isolation", "-w", built, staging),
            ],
            check=True,
        )
        (wheel,) = built.glob("*.whl")
        target = out / wheel.name
        shutil.copyfile(wheel, target)
    return target


@click.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=ROOT / "dist",
    show_default=True,
    help="Folder for the wheel.",
)
def main(out: Path) -> None:
    """Build the edgefleet-agent wheel; prints its path."""
    try:
        wheel = build(out)
    except subprocess.CalledProcessError as exc:
        click.echo(f"agent-wheel: error: pip could not build the wheel (exit {exc.returncode})")
        sys.exit(2)
    click.echo(wheel)


if __name__ == "__main__":
    main()
