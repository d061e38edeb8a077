"""What the reference recipes share: the result record, seeding, the split and the files.

Every recipe writes the same four files into its output folder, so that the converter
and the tests can treat any reference model alike:

- ``model.keras``: the trained Keras model (built-in layers only, loads anywhere);
- ``calibration.npz``: array ``x``, float32 samples from the TRAIN split, for int8 calibration;
- ``eval.npz``: arrays ``x`` (float32) and ``y`` (int64 labels), the held-out test split;
- ``labels.txt``: one class name per line, line ``i`` naming class ``i``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf
from sklearn.model_selection import train_test_split

MODEL_FILE = "model.keras"
CALIBRATION_FILE = "calibration.npz"
EVAL_FILE = "eval.npz"
LABELS_FILE = "labels.txt"
ARTIFACT_FILES = (MODEL_FILE, CALIBRATION_FILE, EVAL_FILE, LABELS_FILE)

# The split does not follow the training seed: every seed is then judged on the same
# held-out samples, so accuracies of different seeds can be compared.
SPLIT_SEED = 0
TEST_FRACTION = 0.25

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RecipeResult:
    """What one recipe produced; ``seconds`` is wall time from loading data to the last file."""

    name: str
    path: Path
    accuracy: float
    params: int
    seconds: float


@dataclass(frozen=True)
class Dataset:
    """A whole data set, already preprocessed into what the model takes."""

    x: FloatArray
    y: LabelArray
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    x_train: FloatArray
    y_train: LabelArray
    x_test: FloatArray
    y_test: LabelArray


def seed_everything(seed: int) -> None:
    """Make a training run repeatable: same seed, same weights, same predictions."""
    keras.utils.set_random_seed(seed)
    # Without this, some TF kernels pick reduction orders at run time and the last bits
    # of the weights (and so, now and then, a prediction) differ between runs.
    tf.config.experimental.enable_op_determinism()


def stratified_split(x: npt.ArrayLike, y: npt.ArrayLike) -> Split:
    """Split into train and held-out test, keeping class proportions, the same every time."""
    x_train, x_test, y_train, y_test = train_test_split(
        np.asarray(x, dtype=np.float32),
        np.asarray(y, dtype=np.int64),
        test_size=TEST_FRACTION,
        stratify=y,
        random_state=SPLIT_SEED,
    )
    return Split(x_train, y_train, x_test, y_test)


def compile_and_fit(model: Any, split: Split, *, epochs: int, batch_size: int) -> Any:
    """Both recipes are softmax classifiers over integer labels, trained with Adam."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(split.x_train, split.y_train, epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def accuracy(model: Any, x: FloatArray, y: LabelArray) -> float:
    """Top-1 accuracy of a softmax classifier."""
    probabilities = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=-1) == y))


def write_artifacts(
    out: Path,
    model: Any,
    split: Split,
    labels: Sequence[str],
) -> None:
    """Write the four files every recipe delivers into ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    # Calibration is the whole TRAIN split: the held-out set must not leak into the
    # quantisation ranges, and these data sets are small enough to keep every sample.
    np.savez(out / CALIBRATION_FILE, x=np.ascontiguousarray(split.x_train, dtype=np.float32))
    np.savez(
        out / EVAL_FILE,
        x=np.ascontiguousarray(split.x_test, dtype=np.float32),
        y=np.ascontiguousarray(split.y_test, dtype=np.int64),
    )
    (out / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")


def run_recipe(
    name: str,
    out: Path,
    *,
    seed: int,
    load: Callable[[], Dataset],
    fit: Callable[[Split], Any],
    prepare: Callable[[Split], Split] | None = None,
) -> RecipeResult:
    """Seed, load, split, prepare, fit, score on held-out data and write the files, timing all.

    ``prepare`` is preprocessing fitted on the train split and applied to both splits; the
    data files hold its output, which is what the model takes.
    """
    start = time.perf_counter()
    seed_everything(seed)
    dataset = load()
    split = stratified_split(dataset.x, dataset.y)
    if prepare is not None:
        split = prepare(split)
    model = fit(split)
    held_out = accuracy(model, split.x_test, split.y_test)
    write_artifacts(out, model, split, dataset.labels)
    return RecipeResult(
        name=name,
        path=out,
        accuracy=held_out,
        params=int(model.count_params()),
        seconds=time.perf_counter() - start,
    )
