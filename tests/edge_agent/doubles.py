"""Test doubles for serving: an observer that records, real models that fail or take
two inputs. Shared by the serving and local API tests."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.litert import ModelRunner
from edge_agent.loaded_model import LoadedModel, PredictionBatch, load_model
from protocol.manifest import TensorSpec


class Recorder:
    """A PredictionObserver that keeps every call, for the tests to inspect. It asks for
    every input, so that each prediction's input reaches it."""

    drift_sample_interval_s = 0.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[LoadedModel, PredictionBatch]] = []
        self.errors: list[LoadedModel] = []
        self.shadows: list[tuple[LoadedModel, LoadedModel, int | None, int | None]] = []
        self.feedback: list[tuple[str, str, bool]] = []

    def predicted(self) -> int:
        """How many predictions the folds so far handed over."""
        with self.lock:
            return sum(len(batch) for _, batch in self.batches)

    def on_predictions(self, model: LoadedModel, batch: PredictionBatch) -> None:
        with self.lock:
            self.batches.append((model, batch))

    def on_error(self, model: LoadedModel) -> None:
        with self.lock:
            self.errors.append(model)

    def on_shadow(
        self,
        active: LoadedModel,
        candidate: LoadedModel,
        active_top1: int | None,
        candidate_top1: int | None,
    ) -> None:
        with self.lock:
            self.shadows.append((active, candidate, active_top1, candidate_top1))

    def on_feedback(self, model_name: str, model_version: str, correct: bool) -> None:
        with self.lock:
            self.feedback.append((model_name, model_version, correct))


class FailingRunner(ModelRunner):
    """A real runner whose invoke fails, as a model with a broken op would at run time."""

    def run(self, arrays: Any) -> tuple[np.ndarray, ...]:
        raise RuntimeError("tensor arena exhausted")

    def hot_path(self) -> Callable[[Any], tuple[np.ndarray, ...]]:
        return self.run


def failing_model(bundle: Path) -> LoadedModel:
    model = load_model(bundle)
    return LoadedModel(FailingRunner(bundle / model.manifest.model.path), model.manifest, bundle)


def two_input_model(like: LoadedModel, out: Path) -> LoadedModel:
    """A real two-input classifier (4 + 3 features -> 3 labelled classes)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    first = tf.keras.Input((4,), name="first")
    second = tf.keras.Input((3,), name="second")
    joined = tf.keras.layers.Concatenate()([first, second])
    hidden = tf.keras.layers.Dense(8, activation="relu")(joined)
    probabilities = tf.keras.layers.Dense(3, activation="softmax")(hidden)
    keras_model = tf.keras.Model([first, second], probabilities)
    flatbuffer = bytes(tf.lite.TFLiteConverter.from_keras_model(keras_model).convert())
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.tflite").write_bytes(flatbuffer)
    runner = ModelRunner(out / "model.tflite")
    manifest = dataclasses.replace(
        like.manifest,
        name="pair",
        version="0.1.0",
        inputs=tuple(TensorSpec(i.name, i.shape, i.dtype) for i in runner.inputs),
        outputs=tuple(TensorSpec(o.name, o.shape, o.dtype) for o in runner.outputs),
        labels=("red", "green", "blue"),
    )
    return LoadedModel(runner, manifest, out)
