"""The reference recipes deliver what the converter and the fleet demo rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.common import ARTIFACT_FILES, CALIBRATION_FILE, EVAL_FILE, LABELS_FILE, MODEL_FILE

# name -> (input shape of one sample, number of classes, minimum held-out accuracy)
EXPECTED: dict[str, tuple[tuple[int, ...], int, float]] = {
    "digits": ((8, 8, 1), 10, 0.95),
    "tabular": ((30,), 2, 0.93),
}
MIN_CALIBRATION = {"digits": 500, "tabular": 400}


def load_model(folder: Path) -> Any:
    import keras

    return keras.models.load_model(folder / MODEL_FILE)


def predictions(model: Any, folder: Path) -> Any:
    with np.load(folder / EVAL_FILE) as data:
        return model.predict(data["x"], verbose=0)


def test_every_recipe_is_built(reference_models: dict[str, Path]) -> None:
    assert sorted(reference_models) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_writes_the_four_files(reference_models: dict[str, Path], name: str) -> None:
    for file in ARTIFACT_FILES:
        assert (reference_models[name] / file).is_file(), file


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_files_have_the_model_input_shape(
    reference_models: dict[str, Path], name: str
) -> None:
    sample_shape, num_classes, _ = EXPECTED[name]
    folder = reference_models[name]
    with np.load(folder / CALIBRATION_FILE) as calibration:
        assert set(calibration.files) == {"x"}
        assert calibration["x"].dtype == np.float32
        assert calibration["x"].shape[1:] == sample_shape
        assert len(calibration["x"]) >= MIN_CALIBRATION[name]
    with np.load(folder / EVAL_FILE) as evaluation:
        assert set(evaluation.files) == {"x", "y"}
        x, y = evaluation["x"], evaluation["y"]
        assert x.dtype == np.float32
        assert x.shape[1:] == sample_shape
        assert y.dtype == np.int64
        assert y.shape == (len(x),)
        assert y.min() >= 0
        assert y.max() < num_classes
        # A stratified split of these data sets holds every class.
        assert set(np.unique(y)) == set(range(num_classes))


def test_digits_pixels_are_scaled_to_unit_range(reference_models: dict[str, Path]) -> None:
    with np.load(reference_models["digits"] / EVAL_FILE) as evaluation:
        assert evaluation["x"].min() >= 0.0
        assert evaluation["x"].max() <= 1.0


def test_tabular_data_is_standardised_with_train_statistics(
    reference_models: dict[str, Path],
) -> None:
    # One int8 scale for the whole input tensor needs features that share a range.
    with np.load(reference_models["tabular"] / CALIBRATION_FILE) as calibration:
        x = calibration["x"]
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-3)


@pytest.mark.parametrize(
    ("name", "labels"),
    [("digits", [str(digit) for digit in range(10)]), ("tabular", ["malignant", "benign"])],
)
def test_labels_name_each_class_once(
    reference_models: dict[str, Path], name: str, labels: list[str]
) -> None:
    text = (reference_models[name] / LABELS_FILE).read_text(encoding="utf-8")
    assert text.splitlines() == labels
    assert len(labels) == EXPECTED[name][1]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_saved_model_loads_and_meets_its_accuracy(
    reference_models: dict[str, Path], name: str
) -> None:
    folder = reference_models[name]
    probabilities = predictions(load_model(folder), folder)
    with np.load(folder / EVAL_FILE) as evaluation:
        y = evaluation["y"]
    assert probabilities.shape == (len(y), EXPECTED[name][1])
    accuracy = float(np.mean(np.argmax(probabilities, axis=-1) == y))
    assert accuracy >= EXPECTED[name][2]


def test_digits_model_is_weight_heavy_but_not_huge(reference_models: dict[str, Path]) -> None:
    # Enough weights to dominate the .tflite file, so int8 shows a real size cut.
    params = load_model(reference_models["digits"]).count_params()
    assert 80_000 <= params <= 250_000


def test_training_twice_with_one_seed_gives_identical_predictions(tmp_path: Path) -> None:
    from models.tabular import train

    first = train(tmp_path / "first", seed=0)
    second = train(tmp_path / "second", seed=0)
    assert first.accuracy == second.accuracy
    np.testing.assert_array_equal(
        predictions(load_model(first.path), first.path),
        predictions(load_model(second.path), second.path),
    )
