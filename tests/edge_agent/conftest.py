"""Real digits bundles for the agent's tests: one publisher key, three versions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.model import LoadedModel, load_model
from edge_agent.serving import Predictor
from protocol.signing import generate_keypair
from tests.bundles import Bundle, convert
from tests.edge_agent.doubles import Recorder


@dataclass(frozen=True)
class DigitsBundles:
    v1: Bundle  # 1.0.0, float32
    v2: Bundle  # 2.0.0, full int8 (quantized inputs and outputs)
    v3: Bundle  # 3.0.0, float16 weights
    eval_npz: Path  # held-out inputs `x` and labels `y`
    labels: tuple[str, ...]


@pytest.fixture(scope="session")
def digits(
    reference_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> DigitsBundles:
    root = tmp_path_factory.mktemp("digits-bundles")
    private, public = generate_keypair(root / "keys")
    folder = reference_models["digits"]
    data = ("--calibration", folder / "calibration.npz", "--eval", folder / "eval.npz")
    options = ("--labels", folder / "labels.txt", *data)
    v1, v2, v3 = (
        convert(folder, root / f"v{n}", "digits", f"{n}.0.0", private, public, *mode, *options)
        for n, mode in ((1, ()), (2, ("--quantize", "int8")), (3, ("--quantize", "float16")))
    )
    names = tuple((folder / "labels.txt").read_text().split())
    return DigitsBundles(v1, v2, v3, folder / "eval.npz", names)


# One interpreter per test module: loading is cheap, but a test must not see another
# module's interpreter state.
@pytest.fixture(scope="module")
def v1(digits: DigitsBundles) -> LoadedModel:
    return load_model(digits.v1.folder)


@pytest.fixture(scope="module")
def v2(digits: DigitsBundles) -> LoadedModel:
    return load_model(digits.v2.folder)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def predictor(v1: LoadedModel, recorder: Recorder) -> Predictor:
    """A Predictor serving digits 1.0.0, its observer recording every call."""
    predictor = Predictor(recorder)
    predictor.activate(v1)
    return predictor
