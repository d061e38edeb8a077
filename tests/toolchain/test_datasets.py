"""Tests for toolchain.datasets: every bad data set fails with one line naming the problem."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from toolchain.datasets import (
    MIN_CALIBRATION_SAMPLES,
    Dataset,
    InputSignature,
    calibration_warnings,
    check_labels,
    compare_ranges,
    load_dataset,
    summarize,
)
from toolchain.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS = InputSignature(shape=(None, 8, 8, 1), dtype="float32")


def _images(count: int, seed: int = 0) -> npt.NDArray[np.float64]:
    return np.random.default_rng(seed).random((count, 8, 8, 1))


def _npz(tmp_path: Path, name: str = "data.npz", **arrays: Any) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _load(path: Path, signature: InputSignature = DIGITS, role: str = "evaluation") -> Dataset:
    return load_dataset(path, signature, role=role)


def _dataset(x: npt.NDArray[Any], role: str, source: str) -> Dataset:
    return Dataset(x=x, y=None, class_names=None, source=source, role=role)


def _write_png(path: Path, pixels: npt.NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# --- good data -------------------------------------------------------------------------


def test_npz_with_labels_is_cast_to_the_model_dtype(tmp_path: Path) -> None:
    x = _images(20)
    y = np.arange(20) % 10
    path = _npz(tmp_path, x=x, y=y)

    ds = _load(path)

    assert ds.x.dtype == np.float32
    assert ds.x.shape == (20, 8, 8, 1)
    np.testing.assert_allclose(ds.x, x, rtol=1e-6)
    assert ds.y is not None
    assert ds.y.dtype == np.int64
    assert ds.y.tolist() == y.tolist()
    assert ds.class_names is None
    assert ds.source == str(path)
    assert ds.role == "evaluation"


def test_npz_without_labels_has_no_y(tmp_path: Path) -> None:
    ds = _load(_npz(tmp_path, x=_images(5)))

    assert ds.y is None
    assert ds.x.shape == (5, 8, 8, 1)


def test_npy_holds_x_alone(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, _images(7))

    ds = _load(path, role="calibration")

    assert ds.x.shape == (7, 8, 8, 1)
    assert ds.x.dtype == np.float32
    assert ds.y is None


def test_fixed_batch_dimension_accepts_any_sample_count(tmp_path: Path) -> None:
    signature = InputSignature(shape=(1, 8, 8, 1), dtype="float32")

    ds = _load(_npz(tmp_path, x=_images(3)), signature)

    assert len(ds.x) == 3


def test_int_data_into_float_model_keeps_values(tmp_path: Path) -> None:
    x = np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8, 1)

    ds = _load(_npz(tmp_path, x=x))

    assert ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))


def test_bool_data_becomes_zeros_and_ones(tmp_path: Path) -> None:
    x = np.zeros((2, 8, 8, 1), dtype=bool)
    x[1] = True

    ds = _load(_npz(tmp_path, x=x))

    assert ds.x[0].max() == 0.0
    assert ds.x[1].min() == 1.0


def test_integral_floats_into_integer_model_are_accepted(tmp_path: Path) -> None:
    signature = InputSignature(shape=(None, 4), dtype="int8")
    x = np.array([[-128.0, 0.0, 5.0, 127.0]])

    ds = _load(_npz(tmp_path, x=x), signature)

    assert ds.x.dtype == np.int8
    assert ds.x.tolist() == [[-128, 0, 5, 127]]


def test_integral_float_labels_become_int64(tmp_path: Path) -> None:
    ds = _load(_npz(tmp_path, x=_images(3), y=np.array([2.0, 0.0, 1.0])))

    assert ds.y is not None
    assert ds.y.dtype == np.int64
    assert ds.y.tolist() == [2, 0, 1]


def test_dynamic_dimensions_match_any_size(tmp_path: Path) -> None:
    signature = InputSignature(shape=(None, None, 3), dtype="float32")

    ds = _load(_npz(tmp_path, x=np.ones((2, 17, 3))), signature)

    assert ds.x.shape == (2, 17, 3)


# --- unreadable files --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^evaluation data .*nope\.npz: no such file"):
        _load(tmp_path / "nope.npz")


def test_file_that_is_not_npz(tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    path.write_text("label,pixel0\n1,0\n")

    with pytest.raises(DataError, match=r"eval\.npz: is not a NumPy \.npz or \.npy file"):
        _load(path)


def test_truncated_npz(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_images(10))
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(DataError, match=r"is not a valid \.npz archive, or it is truncated"):
        _load(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    path.touch()

    with pytest.raises(DataError, match=r"eval\.npz: is not a valid \.npz archive"):
        _load(path)


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "eval.csv"
    path.write_text("1,2,3\n")

    with pytest.raises(DataError, match=r"unsupported format '\.csv'; expected a \.npz or \.npy"):
        _load(path)


def test_missing_x_lists_the_arrays_present(tmp_path: Path) -> None:
    path = _npz(tmp_path, images=_images(2), labels=np.zeros(2))

    with pytest.raises(DataError, match=r"no array named 'x' \(arrays present: images, labels\)"):
        _load(path)


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.array([[1, None]], dtype=object), allow_pickle=True)

    with pytest.raises(DataError, match=r"holds Python object arrays, which are never loaded"):
        _load(path)


# --- bad x ---------------------------------------------------------------------------------


def test_empty_data_set(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((0, 8, 8, 1)))

    with pytest.raises(DataError, match=r"x holds no samples"):
        _load(path)


def test_shape_mismatch_names_expected_and_got(tmp_path: Path) -> None:
    path = _npz(tmp_path, "eval.npz", x=np.zeros((50, 8, 8)))

    with pytest.raises(DataError) as raised:
        _load(path)

    assert str(raised.value).startswith(
        f"evaluation data {path}: x has shape (50, 8, 8) but the model takes (N, 8, 8, 1)"
    )
    assert "x[..., np.newaxis]" in str(raised.value)


@pytest.mark.parametrize(
    ("shape", "hint"),
    [
        ((3, 1, 8, 8), "np.moveaxis(x, 1, -1)"),
        ((3, 64), "x.reshape(-1, 8, 8, 1)"),
        ((3, 7, 7, 1), ""),
    ],
)
def test_shape_mismatch_hints(tmp_path: Path, shape: tuple[int, ...], hint: str) -> None:
    path = _npz(tmp_path, x=np.zeros(shape))

    with pytest.raises(DataError, match=re.escape(f"x has shape {shape}")) as raised:
        _load(path)

    assert hint in str(raised.value)


def test_shape_mismatch_with_dynamic_dimension(tmp_path: Path) -> None:
    signature = InputSignature(shape=(None, None, 3), dtype="float32")

    with pytest.raises(DataError, match=re.escape("the model takes (N, ?, 3)")):
        _load(_npz(tmp_path, x=np.zeros((2, 5, 4))), signature)


@pytest.mark.parametrize(
    ("x", "dtype"),
    [
        (np.full((2, 8, 8, 1), "a"), "<U1"),
        (np.zeros((2, 8, 8, 1), dtype=np.complex64), "complex64"),
        (np.zeros((2, 8, 8, 1), dtype=[("a", "f4")]), "[('a', '<f4')]"),
        (np.zeros((2, 8, 8, 1), dtype="datetime64[s]"), "datetime64[s]"),
    ],
)
def test_non_numeric_x(tmp_path: Path, x: npt.NDArray[Any], dtype: str) -> None:
    with pytest.raises(
        DataError, match=re.escape(f"x has dtype {dtype} but must hold real numbers")
    ):
        _load(_npz(tmp_path, x=x))


@pytest.mark.parametrize(("value", "what"), [(np.nan, "a NaN"), (-np.inf, "an infinite value")])
def test_non_finite_x_names_the_first_bad_sample(tmp_path: Path, value: float, what: str) -> None:
    x = _images(10)
    x[7, 3, 2, 0] = value
    x[9, 0, 0, 0] = value

    with pytest.raises(DataError, match=rf"x has {what} at sample 7$"):
        _load(_npz(tmp_path, x=x))


def test_nan_into_integer_model(tmp_path: Path) -> None:
    signature = InputSignature(shape=(None, 3), dtype="int8")
    x = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 6.0]])

    with pytest.raises(DataError, match=r"x has a NaN at sample 1$"):
        _load(_npz(tmp_path, x=x), signature)


def test_float_overflowing_the_model_dtype(tmp_path: Path) -> None:
    x = _images(3)
    x[1, 0, 0, 0] = 1e300

    with pytest.raises(DataError, match=r"value 1e\+300 at sample 1, too large for .* float32"):
        _load(_npz(tmp_path, x=x))


def test_fractional_floats_into_integer_model(tmp_path: Path) -> None:
    signature = InputSignature(shape=(None, 8, 8, 1), dtype="uint8")

    with pytest.raises(DataError, match=r"uint8 input, so x must be whole") as raised:
        _load(_npz(tmp_path, x=_images(4)), signature)

    assert "at sample 0" in str(raised.value)


def test_integers_outside_the_model_dtype_range(tmp_path: Path) -> None:
    signature = InputSignature(shape=(None, 2), dtype="uint8")
    x = np.array([[0, 255], [3, 300]])

    with pytest.raises(
        DataError, match=re.escape("value 300 at sample 1, outside the range [0, 255]")
    ):
        _load(_npz(tmp_path, x=x), signature)


# --- bad y ---------------------------------------------------------------------------------


def test_labels_must_be_one_dimensional(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_images(4), y=np.eye(4, 10))

    with pytest.raises(DataError, match=r"y has shape \(4, 10\) but must hold one class index"):
        _load(path)


def test_labels_must_match_the_sample_count(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_images(4), y=np.zeros(3, dtype=int))

    with pytest.raises(DataError, match=r"y has 3 labels but x has 4 samples"):
        _load(path)


def test_labels_must_be_whole_numbers(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_images(3), y=np.array([1.0, 2.5, 0.0]))

    with pytest.raises(DataError, match=r"y has value 2\.5 at sample 1; labels must be whole"):
        _load(path)


def test_labels_must_be_finite(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_images(3), y=np.array([1.0, 0.0, np.nan]))

    with pytest.raises(DataError, match=r"y has a NaN at sample 2"):
        _load(path)


def test_negative_labels(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_images(3), y=np.array([1, 0, -1]))

    with pytest.raises(DataError, match=r"label -1 at sample 2 is negative"):
        _load(path)


def test_string_labels(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_images(2), y=np.array(["cat", "dog"]))

    with pytest.raises(DataError, match=r"y has dtype <U3 but must hold real numbers"):
        _load(path)


# --- check_labels --------------------------------------------------------------------------


def test_check_labels_out_of_range(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_images(5), y=np.array([0, 9, 1, 12, 13]))
    ds = _load(path)

    with pytest.raises(DataError) as raised:
        check_labels(ds, 10)

    assert str(raised.value) == (
        f"evaluation data {path}: label 12 at sample 3 is out of range for a model with 10 classes"
    )


def test_check_labels_accepts_labels_in_range(tmp_path: Path) -> None:
    ds = _load(_npz(tmp_path, x=_images(10), y=np.arange(10)))

    check_labels(ds, 10)


def test_check_labels_without_labels_has_nothing_to_check(tmp_path: Path) -> None:
    check_labels(_load(_npz(tmp_path, x=_images(2))), 10)


# --- image folders -------------------------------------------------------------------------


def test_grayscale_image_folder_is_resized_scaled_and_labelled(tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    # Written out of order and at a different size: labels come from sorted folder names.
    _write_png(folder / "one" / "a.png", np.full((12, 10), 255, dtype=np.uint8))
    _write_png(folder / "one" / "b.PNG", np.full((12, 10), 255, dtype=np.uint8))
    _write_png(folder / "zero" / "a.png", np.zeros((12, 10), dtype=np.uint8))
    (folder / "zero" / "notes.txt").write_text("not an image")

    ds = _load(folder, role="calibration")

    assert ds.x.shape == (3, 8, 8, 1)
    assert ds.x.dtype == np.float32
    assert ds.class_names == ("one", "zero")
    assert ds.y is not None
    assert ds.y.tolist() == [0, 0, 1]
    np.testing.assert_allclose(ds.x[:2], 1.0)
    np.testing.assert_allclose(ds.x[2], 0.0)


def test_rgb_image_folder_keeps_colour(tmp_path: Path) -> None:
    folder = tmp_path / "colours"
    red = np.zeros((20, 30, 3), dtype=np.uint8)
    red[..., 0] = 255
    _write_png(folder / "red" / "r.png", red)
    # A grayscale file in an RGB data set is converted, not refused.
    _write_png(folder / "grey" / "g.png", np.full((5, 5), 51, dtype=np.uint8))
    signature = InputSignature(shape=(None, 6, 6, 3), dtype="float32")

    ds = _load(folder, signature)

    assert ds.x.shape == (2, 6, 6, 3)
    assert ds.class_names == ("grey", "red")
    np.testing.assert_allclose(ds.x[0], 0.2, atol=1e-6)
    np.testing.assert_allclose(ds.x[1, ..., 0], 1.0)
    np.testing.assert_allclose(ds.x[1, ..., 1:], 0.0)


def test_image_folder_for_integer_model_keeps_raw_pixels(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _write_png(folder / "a" / "x.png", np.full((8, 8), 200, dtype=np.uint8))
    signature = InputSignature(shape=(None, 8, 8, 1), dtype="uint8")

    ds = _load(folder, signature)

    assert ds.x.dtype == np.uint8
    assert int(ds.x.max()) == 200


def test_image_folder_needs_class_sub_folders(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()

    with pytest.raises(DataError, match=r"has no class sub-folders"):
        _load(folder)


def test_image_folder_with_loose_images(tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    _write_png(folder / "a.png", np.zeros((8, 8), dtype=np.uint8))

    with pytest.raises(DataError, match=r"has images but no class sub-folders"):
        _load(folder)


def test_image_folder_without_images(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir()
    (folder / "dog" / "readme.txt").write_text("no pictures yet")

    with pytest.raises(DataError, match=r"none of its 2 class sub-folders holds images"):
        _load(folder)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _write_png(folder / "cat" / "good.png", np.zeros((8, 8), dtype=np.uint8))
    bad = folder / "cat" / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")

    with pytest.raises(DataError, match=re.escape(f"cannot read image {bad}")):
        _load(folder)


def test_sixteen_bit_images_are_refused_rather_than_clipped(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _write_png(folder / "cat" / "deep.png", np.full((8, 8), 40000, dtype=np.uint16))

    with pytest.raises(DataError, match=r"deep\.png has I;16\w* pixels; only 8-bit images"):
        _load(folder)


def test_image_folder_needs_an_image_shaped_input(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _write_png(folder / "cat" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    signature = InputSignature(shape=(None, 64), dtype="float32")

    with pytest.raises(
        DataError, match=r"image folders need a model input of shape \(N, H, W, C\)"
    ):
        _load(folder, signature)


def test_check_labels_compares_class_folders_with_the_model(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for name in ("cat", "dog", "eel"):
        _write_png(folder / name / "a.png", np.zeros((8, 8), dtype=np.uint8))
    ds = _load(folder)

    with pytest.raises(DataError, match=r"has 3 class sub-folders but the model has 10 classes"):
        check_labels(ds, 10)


# --- warnings and summaries ----------------------------------------------------------------


def test_few_calibration_samples_warns(tmp_path: Path) -> None:
    ds = _load(_npz(tmp_path, x=_images(MIN_CALIBRATION_SAMPLES - 1)), role="calibration")

    warnings = calibration_warnings(ds)

    assert len(warnings) == 1
    assert "only 99 samples" in warnings[0]
    assert warnings[0].startswith("calibration data ")


def test_enough_calibration_samples_do_not_warn(tmp_path: Path) -> None:
    ds = _load(_npz(tmp_path, x=_images(MIN_CALIBRATION_SAMPLES)), role="calibration")

    assert calibration_warnings(ds) == []


def test_constant_calibration_data_warns() -> None:
    ds = _dataset(np.zeros((200, 8, 8, 1), dtype=np.float32), "calibration", "cal.npz")

    assert any("every value is 0" in w for w in calibration_warnings(ds))


def test_compare_ranges_catches_unscaled_evaluation_data() -> None:
    calibration = _dataset(_images(200).astype(np.float32), "calibration", "cal.npz")
    evaluation = _dataset((_images(50, seed=1) * 255).astype(np.float32), "evaluation", "ev.npz")

    warnings = compare_ranges(calibration, evaluation)

    assert len(warnings) == 1
    assert warnings[0].startswith("evaluation data ev.npz: values span [")
    assert "calibration data cal.npz spans [" in warnings[0]


def test_compare_ranges_catches_shifted_mean() -> None:
    cal_x = np.full((1000, 8, 8, 1), 0.05, dtype=np.float32)
    cal_x[:10] = 1.0  # a few bright samples stretch the range without moving the mean
    calibration = _dataset(cal_x, "calibration", "cal.npz")
    evaluation = _dataset(np.full((50, 8, 8, 1), 0.9, dtype=np.float32), "evaluation", "ev.npz")

    warnings = compare_ranges(calibration, evaluation)

    assert len(warnings) == 1
    assert "standard deviations from the mean" in warnings[0]


def test_compare_ranges_is_quiet_for_matching_data() -> None:
    calibration = _dataset(_images(200).astype(np.float32), "calibration", "cal.npz")
    evaluation = _dataset(_images(50, seed=1).astype(np.float32), "evaluation", "ev.npz")

    assert compare_ranges(calibration, evaluation) == []


def test_summarize(tmp_path: Path) -> None:
    x = _images(1347)
    x[0] = 0.0
    x[1] = 1.0
    ds = _load(_npz(tmp_path, x=x, y=np.arange(1347) % 10))

    assert summarize(ds) == "1347 samples, x (8, 8, 1) float32 in [0, 1], 10 classes"


def test_summarize_without_labels(tmp_path: Path) -> None:
    ds = _load(_npz(tmp_path, x=np.ones((1, 8, 8, 1))))

    assert summarize(ds) == "1 sample, x (8, 8, 1) float32 in [1, 1], no labels"


# --- the module itself ---------------------------------------------------------------------


def test_unknown_role_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        load_dataset(_npz(tmp_path, x=_images(1)), DIGITS, role="training")


@pytest.mark.parametrize("dtype", ["string", "complex64", "no-such-type"])
def test_signature_with_unsupported_input_dtype(dtype: str) -> None:
    with pytest.raises(DataError, match=rf"the model's input has dtype {dtype}; calibration"):
        InputSignature(shape=(None, 3), dtype=dtype)


def test_importing_does_not_pull_in_tensorflow_or_pillow() -> None:
    code = (
        "import sys, toolchain.datasets; "
        "heavy = [m for m in ('tensorflow', 'keras', 'PIL') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
