"""Models that are not one softmax head: several outputs, and one sigmoid score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protocol.manifest import read_manifest
from tests.toolchain.cli_helpers import run_cli


@pytest.fixture(scope="module")
def data(reference_models: dict[str, Path]) -> dict[str, np.ndarray]:
    with np.load(reference_models["tabular"] / "eval.npz") as archive:
        return {"x": archive["x"], "y": archive["y"]}


def _two_headed(path: Path) -> Path:
    """Outputs of different shapes, declared in an order TFLite does not keep."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((30,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    aux = keras.layers.Dense(3, name="aux")(hidden)
    scores = keras.layers.Dense(2, activation="softmax", name="scores")(hidden)
    keras.Model(inputs, [scores, aux]).save(path)
    return path


def _sigmoid(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((30,))
    outputs = keras.layers.Dense(1, activation="sigmoid")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    model.fit(x, y, epochs=20, verbose=0)
    model.save(path)
    return path


def test_several_outputs_are_matched_to_the_source_by_shape(
    data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    src = _two_headed(tmp_path / "two.keras")
    evaluation = tmp_path / "eval.npz"
    np.savez(evaluation, x=data["x"], y=data["y"])
    out = tmp_path / "out"
    result = run_cli("convert", src, "--out", out, "--eval", evaluation, "--runs", "5")
    assert result.exit_code == 0, result.stderr
    v = read_manifest(out).manifest.validation
    assert v is not None
    # Matched outputs agree to float precision; mismatched ones would differ wildly.
    assert v.top1_agreement == 1.0
    assert v.max_abs_error < 1e-4


def test_a_sigmoid_classifier_is_gated_on_accuracy(
    data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    src = _sigmoid(tmp_path / "sigmoid.keras", data["x"], data["y"])
    evaluation = tmp_path / "eval.npz"
    np.savez(evaluation, x=data["x"], y=data["y"])
    out = tmp_path / "out"
    args = ("convert", src, "--out", out, "--eval", evaluation, "--calibration", evaluation)
    result = run_cli(*args, "--quantize", "int8", "--runs", "5")
    assert result.exit_code == 0, result.stderr
    v = read_manifest(out).manifest.validation
    assert v is not None
    assert v.source_accuracy is not None
    assert v.source_accuracy > 0.9
    assert v.accuracy_drop is not None
    assert v.top1_agreement is not None


def test_binary_labels_out_of_range_are_refused(
    data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    src = _sigmoid(tmp_path / "sigmoid.keras", data["x"], data["y"])
    evaluation = tmp_path / "eval.npz"
    np.savez(evaluation, x=data["x"], y=data["y"] + 1)
    out = tmp_path / "out"
    result = run_cli("convert", src, "--out", out, "--eval", evaluation)
    assert result.exit_code == 2
    assert "out of range for a model with 2 classes" in result.stderr
