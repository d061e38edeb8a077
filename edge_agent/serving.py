"""Local inference: the in-process API that applications embedding the agent call directly.

`Predictor` holds the active model (the one that answers) and an optional shadow candidate
(which runs on the same inputs so that the update machine can judge it, but never answers).
Switching models must not stall traffic, so no lock is ever held across an inference except
the one that belongs to the model's own interpreter.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.model import LoadedModel, Prediction, PredictionObserver
from edge_agent.runtime import InputShapeError, ModelRunner, TensorInfo

logger = logging.getLogger(__name__)

# How far from 1.0 a float output may sum and still be read as a probability distribution.
# Score vectors up to this long are read in plain Python (see _classify_small).
SMALL_VECTOR = 64
PROBABILITY_TOLERANCE = 1e-3


class NoModelError(RuntimeError):
    """No model is loaded yet, so there is nothing to answer with."""


class UnknownPredictionError(KeyError):
    """Feedback for a prediction id this agent never issued, or has since forgotten."""

    def __str__(self) -> str:
        # KeyError's own str() is the repr of its argument, which reads badly as a message.
        return str(self.args[0]) if self.args else "unknown prediction id"


# --- one lock per interpreter ---------------------------------------------------------------

# Keyed by runner rather than by LoadedModel: two LoadedModels may wrap the same runner (the
# active model set as its own shadow, two Predictors sharing a model), and it is the runner's
# interpreter that must never run two invokes at once. Weak keys let unloaded models go.
_RUNNER_LOCKS: weakref.WeakKeyDictionary[ModelRunner, threading.Lock] = weakref.WeakKeyDictionary()
_RUNNER_LOCKS_GUARD = threading.Lock()


def _lock_for(runner: ModelRunner) -> threading.Lock:
    with _RUNNER_LOCKS_GUARD:
        lock = _RUNNER_LOCKS.get(runner)
        if lock is None:
            lock = _RUNNER_LOCKS[runner] = threading.Lock()
        return lock


@dataclass(frozen=True, eq=False)
class _Slot:
    """A model together with its interpreter's lock, looked up once when it is installed."""

    model: LoadedModel
    lock: threading.Lock


@dataclass(frozen=True)
class _Issued:
    """What feedback needs to know about a prediction after the model may have changed."""

    model_name: str
    model_version: str
    top1: int | None
    labels: tuple[str, ...] | None
    classes: int


# --- preparing one sample -------------------------------------------------------------------


def _format_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def _real_dtype(info: TensorInfo) -> np.dtype[Any]:
    dtype = np.dtype(info.dtype)
    # Quantized inputs take real values; the runner quantizes them at the edge.
    if info.quantized and dtype.kind in "iu":
        return np.dtype(np.float32)
    return dtype


def _prepare_one(position: int, values: Any, info: TensorInfo) -> np.ndarray:
    try:
        array = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise InputShapeError(
            f"input {position} ({info.name}) expects shape {_format_shape(info.shape)}, "
            "got a ragged or malformed nested list"
        ) from exc
    if array.dtype.kind not in "biuf":
        raise InputShapeError(
            f"input {position} ({info.name}) must be numeric, got dtype {array.dtype}"
        )
    expected = info.shape
    if array.shape != expected:
        if expected[:1] == (1,) and array.shape == expected[1:]:
            array = array[np.newaxis]
        else:
            without_batch = f" or {_format_shape(expected[1:])}" if expected[:1] == (1,) else ""
            raise InputShapeError(
                f"input {position} ({info.name}) expects shape {_format_shape(expected)}"
                f"{without_batch}, got {_format_shape(array.shape)}"
            )
    dtype = _real_dtype(info)
    if array.dtype == dtype and array.flags.c_contiguous:
        return array  # what the caller sent is what the runner takes: no copy, no cast
    with np.errstate(invalid="ignore", over="ignore"):
        return np.ascontiguousarray(array, dtype=dtype)


def _prepare(runner: ModelRunner, inputs: Any) -> list[np.ndarray]:
    """One sample as the runner takes it: one array per input, each with its batch axis."""
    specs = runner.inputs
    if len(specs) == 1:
        # A one-element list holding an array is "one array per input", not an extra axis.
        if (
            isinstance(inputs, list | tuple)
            and len(inputs) == 1
            and isinstance(inputs[0], np.ndarray)
        ):
            inputs = inputs[0]
        return [_prepare_one(0, inputs, specs[0])]
    if not isinstance(inputs, list | tuple):
        raise InputShapeError(
            f"model takes {len(specs)} inputs: give a sequence of {len(specs)} arrays, "
            f"one per input, got {type(inputs).__name__}"
        )
    if len(inputs) != len(specs):
        raise InputShapeError(f"model takes {len(specs)} inputs, got {len(inputs)}")
    return [
        _prepare_one(i, values, info)
        for i, (values, info) in enumerate(zip(inputs, specs, strict=True))
    ]


# One random prefix per process and a counter: ids unique across restarts and devices, at a
# fraction of uuid4's cost (which reads the OS's randomness on every prediction).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def _prediction_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# --- reading a classifier's answer ----------------------------------------------------------


def _classify(
    first: np.ndarray, labels: tuple[str, ...] | None, info: TensorInfo | None = None
) -> tuple[int | None, float | None, int]:
    """(top1, confidence, number of classes) from the first output of one sample.

    `info` describes the output tensor: a quantized output's values sit on a grid of width
    `scale`, so a dequantized softmax sums to 1 only within half a step per class.
    """
    scores = np.asarray(first, dtype=np.float64)
    if scores.size == 0 or scores.size != scores.shape[-1]:
        # Anything but one vector of scores (a sequence, an image) has no single top-1 class.
        return None, None, 0
    scores = scores.reshape(-1)
    classes = scores.size
    if 1 < classes <= SMALL_VECTOR:
        answer = _classify_small(scores.tolist(), info)
        if answer is not None:
            return answer
    finite = bool(np.isfinite(scores).all())
    in_unit = finite and bool(((scores >= 0.0) & (scores <= 1.0)).all())
    if classes == 1:
        if labels is None:
            return None, None, 0  # one unlabelled value: a regression, not a class
        score = float(scores[0])
        if in_unit:
            top1 = 1 if score >= 0.5 else 0
            return top1, (score if top1 == 1 else 1.0 - score), max(len(labels), 2)
        if len(labels) == 2 and finite:
            # A single logit for a two-label model: class 1 where sigmoid(logit) >= 0.5.
            return (1 if score >= 0.0 else 0), None, 2
        return 0, None, len(labels)
    top1 = int(np.argmax(scores))
    tolerance = PROBABILITY_TOLERANCE
    if info is not None and info.quantized:
        tolerance += classes * info.scale / 2
    if in_unit and abs(float(scores.sum()) - 1.0) <= tolerance:
        return top1, float(scores[top1]), classes
    return top1, None, classes


def _classify_small(
    scores: list[float], info: TensorInfo | None
) -> tuple[int | None, float | None, int] | None:
    """_classify for a short vector of finite scores, in plain Python: numpy's per-call
    overhead on a handful of numbers costs more than the arithmetic, on every prediction.
    None when a score is not finite: _classify's numpy path decides those."""
    total = math.fsum(scores)
    if not math.isfinite(total):
        return None
    classes = len(scores)
    top1 = max(range(classes), key=scores.__getitem__)  # the first of equal maxima, as argmax
    tolerance = PROBABILITY_TOLERANCE
    if info is not None and info.quantized:
        tolerance += classes * info.scale / 2
    if min(scores) >= 0.0 and scores[top1] <= 1.0 and abs(total - 1.0) <= tolerance:
        return top1, scores[top1], classes
    return top1, None, classes


def _label_index(label: object, issued: _Issued) -> int:
    if isinstance(label, str):
        if issued.labels is None:
            raise ValueError(
                f"model {issued.model_name} {issued.model_version} has no labels: "
                f"give a class index from 0 to {issued.classes - 1}"
            )
        try:
            return issued.labels.index(label)
        except ValueError:
            raise ValueError(
                f"label {label!r} is not one of the labels of model "
                f"{issued.model_name} {issued.model_version}"
            ) from None
    if isinstance(label, bool):
        raise ValueError("label must be a class index or a label string, not a boolean")
    try:
        index = operator.index(label)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"label must be a class index or a label string, got {type(label).__name__}"
        ) from None
    if not 0 <= index < issued.classes:
        raise ValueError(
            f"label {index} is out of range: model {issued.model_name} "
            f"{issued.model_version} has classes 0 to {issued.classes - 1}"
        )
    return index


# --- the predictor --------------------------------------------------------------------------


class Predictor:
    """Answers predictions with the active model; thread-safe."""

    def __init__(
        self, observer: PredictionObserver | None = None, *, max_remembered: int = 10_000
    ) -> None:
        if max_remembered < 0:
            raise ValueError(f"max_remembered must not be negative, got {max_remembered}")
        self._observer = observer
        self._max_remembered = max_remembered
        # Guards only the two references; held for an assignment or a read, never an invoke.
        self._switch = threading.Lock()
        self._active: _Slot | None = None
        self._shadow: _Slot | None = None
        self._issued: OrderedDict[str, _Issued] = OrderedDict()
        self._issued_lock = threading.Lock()
        self._observer_failures: set[str] = set()
        self._shadow_failure_logged_for: LoadedModel | None = None

    @property
    def active(self) -> LoadedModel | None:
        slot = self._active
        return slot.model if slot is not None else None

    @property
    def shadow(self) -> LoadedModel | None:
        slot = self._shadow
        return slot.model if slot is not None else None

    def activate(self, model: LoadedModel | None) -> LoadedModel | None:
        """Answer every later request with `model` (None unloads); returns the previous one.

        Requests already running finish on the model they started with.
        """
        slot = _Slot(model, _lock_for(model.runner)) if model is not None else None
        with self._switch:
            previous, self._active = self._active, slot
        return previous.model if previous is not None else None

    def set_shadow(self, candidate: LoadedModel | None) -> None:
        """Run `candidate` beside the active model on every request (None stops it)."""
        slot = _Slot(candidate, _lock_for(candidate.runner)) if candidate is not None else None
        with self._switch:
            self._shadow = slot

    def predict(self, inputs: np.ndarray | Sequence[np.ndarray]) -> Prediction:
        """Run one sample on the active model.

        Raises NoModelError when nothing is loaded, InputShapeError for inputs of the wrong
        number, shape or dtype, and whatever the runtime raised when the invoke fails.
        """
        with self._switch:
            active, shadow = self._active, self._shadow
        if active is None:
            raise NoModelError("no model is loaded")
        model = active.model
        arrays = _prepare(model.runner, inputs)
        with active.lock:
            start = time.perf_counter()
            try:
                outputs = model.runner.invoke_once(arrays)
            except InputShapeError:
                raise  # the caller's mistake, not the model's
            except Exception:
                self._notify("on_error", model)
                raise
            latency_ms = (time.perf_counter() - start) * 1000.0
        for output in outputs:
            # Observers and callers share these arrays; none of them may change another's view.
            output.setflags(write=False)
        first_info = model.runner.outputs[0] if model.runner.outputs else None
        top1, confidence, classes = (
            _classify(outputs[0], model.labels, first_info) if outputs else (None, None, 0)
        )
        labels = model.labels
        label = labels[top1] if labels and top1 is not None and top1 < len(labels) else None
        prediction = Prediction(
            prediction_id=_prediction_id(),
            outputs=tuple(outputs),
            top1=top1,
            label=label,
            confidence=confidence,
            model_name=model.name,
            model_version=model.version,
            latency_ms=latency_ms,
        )
        self._remember(prediction, labels, classes)
        self._notify("on_prediction", model, prediction, arrays)
        if shadow is not None:
            self._run_shadow(model, shadow, inputs, top1)
        return prediction

    def _run_shadow(
        self, active: LoadedModel, shadow: _Slot, inputs: Any, active_top1: int | None
    ) -> None:
        candidate = shadow.model
        try:
            # Prepared again: the candidate may want another dtype (or, wrongly, shape).
            arrays = _prepare(candidate.runner, inputs)
            with shadow.lock:
                outputs = candidate.runner.invoke_once(arrays)
            info = candidate.runner.outputs[0] if candidate.runner.outputs else None
            top1 = _classify(outputs[0], candidate.labels, info)[0] if outputs else None
        except Exception:
            if self._shadow_failure_logged_for is not candidate:
                self._shadow_failure_logged_for = candidate
                logger.exception(
                    "shadow candidate %s %s failed; the active model answered "
                    "(later failures of this candidate are not logged)",
                    candidate.name,
                    candidate.version,
                )
            self._notify("on_error", candidate)
            return
        self._notify("on_shadow", active, candidate, active_top1, top1)

    def _remember(
        self, prediction: Prediction, labels: tuple[str, ...] | None, classes: int
    ) -> None:
        if self._max_remembered == 0:
            return
        issued = _Issued(
            prediction.model_name, prediction.model_version, prediction.top1, labels, classes
        )
        with self._issued_lock:
            self._issued[prediction.prediction_id] = issued
            while len(self._issued) > self._max_remembered:
                self._issued.popitem(last=False)

    def feedback(self, prediction_id: str, label: int | str) -> bool:
        """Tell the agent the true label of an earlier prediction; returns whether it was right.

        Raises UnknownPredictionError for an id never issued or already forgotten, and
        ValueError for a label that is out of range or not one of the model's labels.
        """
        with self._issued_lock:
            issued = self._issued.get(prediction_id)
            if issued is not None:
                self._issued.move_to_end(prediction_id)
        if issued is None:
            raise UnknownPredictionError(
                f"prediction {prediction_id!r} is unknown or has been forgotten"
            )
        if issued.top1 is None:
            raise ValueError(
                f"prediction {prediction_id!r} has no top-1 class to compare a label with"
            )
        correct = _label_index(label, issued) == issued.top1
        self._notify("on_feedback", issued.model_name, issued.model_version, correct)
        return correct

    def _notify(self, method: str, *args: Any) -> None:
        observer = self._observer
        if observer is None:
            return
        try:
            getattr(observer, method)(*args)
        except Exception:
            # Telemetry must never cost a request; one log line per broken hook is enough.
            if method not in self._observer_failures:
                self._observer_failures.add(method)
                logger.exception(
                    "prediction observer %s failed (later failures are not logged)", method
                )
