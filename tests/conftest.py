"""Shared fixtures.

TensorFlow is imported only inside the fixtures that need it, so that test runs which
never touch a model do not pay its import time.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.bundles import DigitsBundles, digits_bundles

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_SOURCES = REPO_ROOT / "models"


def recipe_digest() -> str:
    """sha256 over every recipe source file, so that editing any of them retrains."""
    digest = hashlib.sha256()
    for source in sorted(RECIPE_SOURCES.glob("*.py")):
        # The name is hashed too: renaming a file can change what the registry imports.
        digest.update(source.name.encode())
        digest.update(b"\0")
        digest.update(source.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def train_all(out: Path) -> None:
    from models.train import RECIPES

    for name, train in RECIPES.items():
        train(out / name, seed=0)


def cached_models(cache_root: Path) -> Path:
    """The folder holding every trained recipe, trained now only if not cached already."""
    final = cache_root / recipe_digest()
    if not final.is_dir():
        # Train into a temporary sibling and rename it into place in one step, so an
        # interrupted run leaves only a stray temporary folder, never a half-filled cache.
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_root))
        try:
            train_all(scratch)
            scratch.rename(final)
        except OSError:
            # Another session (pytest-xdist, a second terminal) finished first; use its copy.
            if not final.is_dir():
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def reference_models(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """name -> folder with model.keras, calibration.npz, eval.npz and labels.txt."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        # The cache plugin is off (-p no:cacheprovider): train afresh for this session.
        root = tmp_path_factory.mktemp("edgefleet-models")
    else:
        root = Path(cache.mkdir("edgefleet-models"))
    folder = cached_models(root)
    return {path.name: path for path in sorted(folder.iterdir()) if path.is_dir()}


@pytest.fixture(scope="session")
def mosquitto_executable() -> str:
    from devfleet.mosquitto import find_mosquitto

    executable = find_mosquitto()
    if executable is None:
        pytest.fail(
            "the mosquitto broker is not installed; `make test` installs it "
            "(apt-get install mosquitto mosquitto-clients)",
            pytrace=False,
        )
    return executable


@pytest.fixture(scope="session")
def digits(
    reference_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> DigitsBundles:
    """Real digits bundles: one publisher key, three versions."""
    return digits_bundles(reference_models["digits"], tmp_path_factory.mktemp("digits-bundles"))
