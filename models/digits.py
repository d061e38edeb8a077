"""Reference image classifier: a small CNN on scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.datasets import load_digits

from models.common import Dataset, RecipeResult, Split, compile_and_fit, run_recipe

NAME = "digits"
PIXEL_MAX = 16.0  # load_digits counts ink in each 8x8 cell from 0 to 16
EPOCHS = 15
BATCH_SIZE = 32


def load() -> Dataset:
    """All 1797 digits as (N, 8, 8, 1) float32 in [0, 1], labels 0..9."""
    digits = load_digits()
    x = (digits.images / PIXEL_MAX).astype(np.float32)[..., np.newaxis]
    labels = tuple(str(int(name)) for name in digits.target_names)
    return Dataset(x=x, y=digits.target.astype(np.int64), labels=labels)


def build(num_classes: int = 10) -> Any:
    """Conv features, then one wide dense layer.

    The dense layer holds most of the ~150k weights on purpose: the model is a stand-in
    for real ones, whose files are mostly weights, so int8 quantisation visibly shrinks it.
    """
    inputs = keras.Input(shape=(8, 8, 1), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    # 1347 training images are few for 150k weights; dropout keeps it from memorising them.
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=NAME)


def fit(split: Split) -> Any:
    return compile_and_fit(build(), split, epochs=EPOCHS, batch_size=BATCH_SIZE)


def train(out: Path, *, seed: int = 0, shuffled_labels: bool = False) -> RecipeResult:
    """Train the digits CNN and write its four files into ``out``.

    `shuffled_labels` trains on the training labels in a random order: a deliberately
    broken model, as a bad data pipeline would make one, for the rollout demo and tests
    to catch. Its files (calibration, evaluation data, labels) are the honest ones.
    """
    if not shuffled_labels:
        return run_recipe(NAME, out, seed=seed, load=load, fit=fit)

    def fit_on_shuffled(split: Split) -> Any:
        order = np.random.default_rng(seed).permutation(len(split.y_train))
        broken = Split(split.x_train, split.y_train[order], split.x_test, split.y_test)
        return fit(broken)

    return run_recipe(NAME, out, seed=seed, load=load, fit=fit_on_shuffled)
