"""A fresh virtual environment with one wheel installed, as a user's machine would have it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Run what was installed, not the source tree: no PYTHONPATH.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def install_fresh(root: Path, wheel: Path) -> Path:
    """A venv under `root` (no system site-packages) with `wheel` and its dependencies,
    pinned to this environment's versions so that pip's cache serves them; its bin dir."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pins = root / "constraints.txt"
    frozen = [sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude", "edgefleet"]
    pins.write_text(subprocess.run(frozen, capture_output=True, text=True, check=True).stdout)
    install = subprocess.run(
        [venv / "bin" / "pip", "install", "--quiet", "--constraint", pins, wheel],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    return venv / "bin"
