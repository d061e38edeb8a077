"""Load calibration and evaluation data and check that it fits the model.

Every check here is vectorised NumPy and runs in well under a second, so a bad data set
fails with one clear line before any slow conversion starts. For the same reason this
module never imports TensorFlow, and imports Pillow only when a folder of images is read.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from toolchain.errors import DataError

MIN_CALIBRATION_SAMPLES = 100

_ROLES = ("calibration", "evaluation")
_ARRAY_SUFFIXES = (".npz", ".npy")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_REAL_KINDS = "biuf"  # bool, signed int, unsigned int, float
# Quantization clips everything outside the calibration range, so evaluation values that
# stray more than this fraction of the calibration span beyond it are worth a warning.
_RANGE_TOLERANCE = 0.10
# Means further apart than this many calibration standard deviations suggest the two sets
# were not prepared the same way, even when their ranges overlap.
_MEAN_SHIFT_STDS = 3.0

Array = npt.NDArray[Any]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class InputSignature:
    """The model's single input: batch dimension first, None for a dimension of any size."""

    shape: tuple[int | None, ...]
    dtype: str

    def __post_init__(self) -> None:
        # A malformed shape is a mistake in the calling code, hence ValueError.
        if not self.shape:
            raise ValueError("an input signature needs at least the batch dimension")
        if any(dim is not None and dim < 1 for dim in self.shape):
            raise ValueError(f"input shape {self.shape}: use None for a dimension of any size")
        # A model that takes strings (or bfloat16, unknown to NumPy) is real, though: the user
        # passed data for it, so they get one line rather than a traceback.
        if _numpy_kind(self.dtype) not in _REAL_KINDS:
            raise DataError(
                f"the model's input has dtype {self.dtype}; calibration and evaluation data "
                "are supported only for bool, integer and float inputs"
            )


def _numpy_kind(dtype: str) -> str:
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "?"


# eq=False: comparing or hashing the arrays field by field would raise, not answer.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Checked data: x already has the model's per-sample shape and dtype."""

    x: Array
    y: Labels | None
    class_names: tuple[str, ...] | None
    source: str
    # Kept so that later checks (check_labels) can name the role like load_dataset does.
    role: str = ""


class _Stats(NamedTuple):
    low: float
    high: float
    mean: float
    std: float


def load_dataset(path: Path, signature: InputSignature, *, role: str) -> Dataset:
    """Read a .npz, .npy or class-per-sub-folder image folder and check it fits `signature`."""
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, not {role!r}")
    path = Path(path)
    where = f"{role} data {path}"
    class_names: tuple[str, ...] | None = None
    y: Array | None
    if path.is_dir():
        x, y, class_names = _read_image_folder(path, signature, where)
    else:
        x, y = _read_array_file(path, where)
    checked_x = _checked_x(x, signature, where)
    labels = None if y is None else _checked_y(y, len(checked_x), where)
    return Dataset(x=checked_x, y=labels, class_names=class_names, source=str(path), role=role)


def check_labels(ds: Dataset, num_classes: int) -> None:
    """Fail if a label (or an image folder's class list) does not fit the model's classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, not {num_classes}")
    where = _where(ds)
    if ds.class_names is not None and len(ds.class_names) != num_classes:
        # Labels come from the sorted folder names, so a different count shifts every class.
        raise DataError(
            f"{where}: has {len(ds.class_names)} class sub-folders but the model has "
            f"{num_classes} classes"
        )
    if ds.y is None:
        return
    flagged = _first_flagged(ds.y >= num_classes)
    if flagged is not None:
        sample = flagged[0]
        raise DataError(
            f"{where}: label {ds.y[sample]} at sample {sample} is out of range for a model "
            f"with {num_classes} classes"
        )


def compare_ranges(calibration: Dataset, evaluation: Dataset) -> list[str]:
    """Warn when the evaluation data does not look like what the model was calibrated on."""
    cal, ev = _stats(calibration.x), _stats(evaluation.x)
    cal_where = _where(calibration, "calibration")
    ev_where = _where(evaluation, "evaluation")
    margin = _RANGE_TOLERANCE * (cal.high - cal.low)
    if ev.low < cal.low - margin or ev.high > cal.high + margin:
        return [
            f"{ev_where}: values span [{_num(ev.low)}, {_num(ev.high)}] but {cal_where} "
            f"spans [{_num(cal.low)}, {_num(cal.high)}]; quantization clips values outside "
            "the calibration range, so check both are scaled the same way"
        ]
    # Only when the ranges agree: a range mismatch usually shifts the mean too, and one
    # warning per cause is easier to act on.
    if cal.std > 0 and abs(ev.mean - cal.mean) > _MEAN_SHIFT_STDS * cal.std:
        return [
            f"{ev_where}: mean {_num(ev.mean)} is more than {_num(_MEAN_SHIFT_STDS)} "
            f"standard deviations from the mean {_num(cal.mean)} of {cal_where} "
            f"(std {_num(cal.std)}); the calibration data may not represent real inputs"
        ]
    return []


def summarize(ds: Dataset) -> str:
    """One line for the CLI, e.g. '1347 samples, x (8, 8, 1) float32 in [0, 1], 10 classes'."""
    count = len(ds.x)
    described = f"x {ds.x.shape[1:]} {ds.x.dtype}"
    if ds.x.size:
        described += f" in [{_num(np.min(ds.x))}, {_num(np.max(ds.x))}]"
    return f"{count} sample{'' if count == 1 else 's'}, {described}, {_label_summary(ds)}"


def calibration_warnings(ds: Dataset) -> list[str]:
    """Warnings about calibration data that will give poor quantization ranges."""
    where = _where(ds, "calibration")
    warnings = []
    if len(ds.x) < MIN_CALIBRATION_SAMPLES:
        warnings.append(
            f"{where}: only {len(ds.x)} samples; quantization ranges from fewer than "
            f"{MIN_CALIBRATION_SAMPLES} samples are unreliable, so use a few hundred "
            "representative ones"
        )
    if ds.x.size and np.min(ds.x) == np.max(ds.x):
        warnings.append(
            f"{where}: every value is {_num(np.min(ds.x))}, so the quantization ranges "
            "will be meaningless"
        )
    return warnings


# --- reading .npz / .npy files ---------------------------------------------------------


def _read_array_file(path: Path, where: str) -> tuple[Array, Array | None]:
    if not path.exists():
        raise DataError(f"{where}: no such file or folder")
    if path.suffix.lower() not in _ARRAY_SUFFIXES:
        raise DataError(
            f"{where}: unsupported format '{path.suffix or path.name}'; expected a .npz or "
            ".npy file, or a folder with one sub-folder of images per class"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: {_unreadable(exc)}") from exc
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded as archive:
        return _arrays_from_archive(archive, where)


def _arrays_from_archive(archive: Any, where: str) -> tuple[Array, Array | None]:
    names = list(archive.files)
    if "x" not in names:
        present = ", ".join(names) if names else "none"
        raise DataError(f"{where}: has no array named 'x' (arrays present: {present})")
    try:
        x = archive["x"]
        y = archive["y"] if "y" in names else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{where}: {_unreadable(exc)}") from exc
    return x, y


def _unreadable(exc: Exception) -> str:
    text = str(exc)
    if "Object arrays" in text:
        return "holds Python object arrays, which are never loaded (unpickling can run code)"
    if "pickled" in text:
        # NumPy's guess when the file has neither the .npy nor the zip signature.
        return "is not a NumPy .npz or .npy file"
    if isinstance(exc, zipfile.BadZipFile | zlib.error | EOFError):
        return f"is not a valid .npz archive, or it is truncated ({text})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot be read: {exc.strerror}"
    return f"cannot be read as a NumPy array ({text})"


# --- reading a folder of images --------------------------------------------------------


def _read_image_folder(
    folder: Path, signature: InputSignature, where: str
) -> tuple[Array, Labels, tuple[str, ...]]:
    height, width, mode = _image_geometry(signature, where)
    class_dirs = _class_folders(folder, where)
    files, labels = _image_files(class_dirs, where)
    _require_pillow(where)
    pixels = np.stack([_read_image(file, (width, height), mode, where) for file in files])
    if mode == "L":
        pixels = pixels[..., np.newaxis]
    # A float model wants [0, 1]; an integer-input model wants the raw 0..255 pixels.
    x = pixels / np.float32(255) if np.dtype(signature.dtype).kind == "f" else pixels
    class_names = tuple(d.name for d in class_dirs)
    return x, np.asarray(labels, dtype=np.int64), class_names


def _image_geometry(signature: InputSignature, where: str) -> tuple[int, int, str]:
    shape = signature.shape
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise DataError(
            f"{where}: image folders need a model input of shape (N, H, W, C) with C 1 or 3, "
            f"but the model takes {_model_shape(shape)}"
        )
    height, width = shape[1], shape[2]
    if height is None or width is None:
        raise DataError(
            f"{where}: the model takes {_model_shape(shape)} with no fixed height and width, "
            "so images cannot be resized for it; pass a .npz instead"
        )
    return height, width, "L" if shape[3] == 1 else "RGB"


def _class_folders(folder: Path, where: str) -> list[Path]:
    entries = _listing(folder, where)
    # Hidden folders (.git, .ipynb_checkpoints) are tooling clutter, not classes.
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not class_dirs:
        if any(_is_image(p) for p in entries):
            raise DataError(
                f"{where}: has images but no class sub-folders; put each class's images "
                "in its own sub-folder"
            )
        raise DataError(f"{where}: has no class sub-folders with images")
    return class_dirs


def _image_files(class_dirs: list[Path], where: str) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        images = [p for p in _listing(class_dir, where) if _is_image(p)]
        files.extend(images)
        labels.extend([label] * len(images))
    if not files:
        raise DataError(
            f"{where}: none of its {len(class_dirs)} class sub-folders holds images "
            f"({', '.join(_IMAGE_SUFFIXES)})"
        )
    return files, labels


def _listing(folder: Path, where: str) -> list[Path]:
    try:
        return sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"{where}: cannot list {folder}: {exc.strerror or exc}") from exc


def _is_image(path: Path) -> bool:
    # Dot files include macOS "._name.png" resource forks, which are not images at all.
    return (
        path.suffix.lower() in _IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def _require_pillow(where: str) -> None:
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise DataError(
            f"{where}: reading image folders needs Pillow (pip install pillow)"
        ) from exc


def _read_image(file: Path, size: tuple[int, int], mode: str, where: str) -> Array:
    from PIL import Image

    try:
        with Image.open(file) as image:
            source_mode = image.mode
            resized = image.convert(mode).resize(size, Image.Resampling.BILINEAR)
    except Image.UnidentifiedImageError as exc:
        raise DataError(f"{where}: cannot read image {file}: not a format Pillow knows") from exc
    # Pillow's decoders fail with a version-dependent mix of OSError, SyntaxError,
    # ValueError, struct.error and DecompressionBombError; all mean the file is unusable.
    except Exception as exc:
        raise DataError(f"{where}: cannot read image {file}: {exc}") from exc
    # Pillow converts 16-bit and float pixels to 8 bits by clipping, not scaling, which
    # would silently turn most of the image white.
    if source_mode.startswith("I") or source_mode == "F":
        raise DataError(
            f"{where}: image {file} has {source_mode} pixels; only 8-bit images are supported"
        )
    return np.asarray(resized, dtype=np.uint8)


# --- checking x and y ------------------------------------------------------------------


def _checked_x(x: Array, signature: InputSignature, where: str) -> Array:
    _require_real(x, "x", where)
    if x.ndim >= 1 and x.shape[0] == 0:
        raise DataError(f"{where}: x holds no samples (shape {x.shape})")
    _require_shape(x, signature.shape, where)
    target = np.dtype(signature.dtype)
    if target.kind == "f":
        return _cast_to_float(x, target, where)
    return _cast_to_integer(x, target, where)


def _checked_y(y: Array, count: int, where: str) -> Labels:
    _require_real(y, "y", where)
    if y.ndim != 1:
        raise DataError(
            f"{where}: y has shape {y.shape} but must hold one class index per sample, "
            f"shape ({count},){_label_shape_hint(y, count)}"
        )
    if len(y) != count:
        raise DataError(f"{where}: y has {len(y)} labels but x has {count} samples")
    if y.dtype.kind == "f":
        _require_finite(y, "y", where)
        _require_integral(y, "y", "labels must be whole class indices", where)
    negative = _first_flagged(y < 0)
    if negative is not None:
        sample = negative[0]
        raise DataError(f"{where}: label {_num(y[sample])} at sample {sample} is negative")
    too_big = _first_flagged(y > np.iinfo(np.int64).max)
    if too_big is not None:
        sample = too_big[0]
        raise DataError(f"{where}: label {_num(y[sample])} at sample {sample} is too large")
    return y.astype(np.int64)


def _require_real(values: Array, name: str, where: str) -> None:
    if values.dtype.kind not in _REAL_KINDS:
        raise DataError(
            f"{where}: {name} has dtype {values.dtype} but must hold real numbers "
            "(bool, integer or float)"
        )


def _require_shape(x: Array, expected: tuple[int | None, ...], where: str) -> None:
    if x.ndim == len(expected) and _fits(x.shape[1:], expected[1:]):
        return
    raise DataError(
        f"{where}: x has shape {x.shape} but the model takes {_model_shape(expected)}"
        f"{_shape_hint(x.shape[1:], expected[1:])}"
    )


def _fits(sample: tuple[int, ...], wanted: tuple[int | None, ...]) -> bool:
    return len(sample) == len(wanted) and all(
        want is None or got == want for got, want in zip(sample, wanted, strict=True)
    )


def _shape_hint(sample: tuple[int, ...], wanted: tuple[int | None, ...]) -> str:
    """Name the usual fix when the mismatch is a common one."""
    if len(sample) == 3 and _fits((*sample[1:], sample[0]), wanted):
        return "; x looks channels-first, try np.moveaxis(x, 1, -1)"
    if _fits((*sample, 1), wanted):
        return "; add the channel axis with x[..., np.newaxis]"
    if sample[-1:] == (1,) and _fits(sample[:-1], wanted):
        return "; drop the last axis with x[..., 0]"
    known = [dim for dim in wanted if dim is not None]
    if len(known) == len(wanted) and math.prod(sample) == math.prod(known):
        dims = ", ".join(str(dim) for dim in known)
        return f"; each sample has the right size, try x.reshape(-1, {dims})"
    return ""


def _label_shape_hint(y: Array, count: int) -> str:
    if y.ndim != 2 or y.shape[0] != count:
        return ""
    if y.shape[1] == 1:
        return "; use y.ravel()"
    return "; if y is one-hot, use y.argmax(axis=1)"


def _require_finite(values: Array, name: str, where: str) -> None:
    flagged = _first_flagged(~np.isfinite(values))
    if flagged is not None:
        raise _non_finite(values, flagged, name, where)


def _non_finite(values: Array, index: tuple[int, ...], name: str, where: str) -> DataError:
    what = "a NaN" if np.isnan(values[index]) else "an infinite value"
    return DataError(f"{where}: {name} has {what} at sample {index[0]}")


def _require_integral(values: Array, name: str, why: str, where: str) -> None:
    flagged = _first_flagged(values != np.trunc(values))
    if flagged is not None:
        raise DataError(
            f"{where}: {name} has value {_num(values[flagged])} at sample {flagged[0]}; {why}"
        )


def _cast_to_integer(x: Array, target: np.dtype[Any], where: str) -> Array:
    if x.dtype.kind == "f":
        _require_finite(x, "x", where)
        _require_integral(x, "x", f"the model takes {target} input, so x must be whole", where)
    low, high = (0, 1) if target.kind == "b" else (np.iinfo(target).min, np.iinfo(target).max)
    flagged = _first_flagged((x < low) | (x > high))
    if flagged is not None:
        raise DataError(
            f"{where}: x has value {_num(x[flagged])} at sample {flagged[0]}, outside the "
            f"range [{low}, {high}] of the model's {target} input"
        )
    return x.astype(target)


def _cast_to_float(x: Array, target: np.dtype[Any], where: str) -> Array:
    # One finiteness pass over the cast result finds both NaN/inf in the data and values
    # that overflow the model's dtype; on large data sets a second pass costs real time.
    with np.errstate(over="ignore"):
        cast = np.ascontiguousarray(x, dtype=target)
    flagged = _first_flagged(~np.isfinite(cast))
    if flagged is not None:
        if not np.isfinite(x[flagged]):
            raise _non_finite(x, flagged, "x", where)
        raise DataError(
            f"{where}: x has value {_num(x[flagged])} at sample {flagged[0]}, too large for "
            f"the model's {target} input"
        )
    return cast


def _first_flagged(mask: npt.NDArray[np.bool_]) -> tuple[int, ...] | None:
    """Index of the first True element, in sample order, or None."""
    if not mask.any():
        return None
    flat = int(np.argmax(mask))
    return tuple(int(i) for i in np.unravel_index(flat, mask.shape))


# --- formatting --------------------------------------------------------------------------


def _where(ds: Dataset, role: str = "") -> str:
    role = ds.role or role
    return f"{role} data {ds.source}" if role else f"data {ds.source}"


def _model_shape(shape: tuple[int | None, ...]) -> str:
    dims = ["N", *("?" if dim is None else str(dim) for dim in shape[1:])]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _num(value: Any) -> str:
    """Short, readable number: 0 and 255 rather than 0.0 and 255.0."""
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return f"{number:.4g}"


def _label_summary(ds: Dataset) -> str:
    if ds.class_names is not None:
        return f"{len(ds.class_names)} classes"
    if ds.y is not None:
        return f"{len(np.unique(ds.y))} classes"
    return "no labels"


def _stats(x: Array) -> _Stats:
    return _Stats(
        low=float(np.min(x)),
        high=float(np.max(x)),
        mean=float(np.mean(x, dtype=np.float64)),
        std=float(np.std(x, dtype=np.float64)),
    )
