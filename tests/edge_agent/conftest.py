"""The agent's tests: loaded digits models, a recording observer and a predictor."""

from __future__ import annotations

import pytest

from edge_agent.loaded_model import LoadedModel, load_model
from edge_agent.serving import Predictor
from tests.bundles import DigitsBundles
from tests.edge_agent.doubles import Recorder


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
