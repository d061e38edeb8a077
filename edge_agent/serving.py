"""Local inference: the in-process API that applications embedding the agent call directly.

`Predictor` holds the active model (the one that answers) and an optional shadow candidate
(which runs on the same inputs so that the update machine can judge it, but never answers).
Switching models must not stall traffic, so no lock is ever held across an inference except
the one that belongs to the model's own interpreter. A fold takes a model's queue under
that lock too, so it waits for the inference in flight on each model, and no longer.

A request does as little as it can beyond the inference: it prepares the input, runs it,
and queues the prediction. Every FOLD_EVERY predictions (and before each telemetry flush,
or when feedback asks for one not yet folded) the queue is folded: the predictions are
read as classes with numpy, all at once, remembered for feedback, and handed to the
observer in one batch per model. Doing that per request cost as much as the inference
itself on a small model.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import re
import secrets
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from common.litert import InputShapeError, ModelRunner, TensorInfo
from edge_agent.classify import NO_CLASS, non_finite
from edge_agent.loaded_model import LoadedModel, Prediction, PredictionBatch, PredictionObserver

logger = logging.getLogger(__name__)

_Arrays = tuple[np.ndarray, ...]  # one sample's inputs, or outputs: an array for each

# Predictions queued before a request folds them. A fold's numpy calls cost about the same
# for any number of predictions, so a long queue spreads them thin; 4,096 predictions'
# outputs and columns are about 1 MB on a ten-class model.
FOLD_EVERY = 4096
# Sampled inputs queued before a request folds them, so large inputs cannot pile up.
FOLD_MAX_SAMPLE_BYTES = 4 << 20


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


@dataclass(eq=False)
class _Slot:
    """A model installed in a Predictor: what every request needs of it, looked up once,
    and the predictions it answered that wait for the next fold."""

    model: LoadedModel
    lock: threading.Lock
    prepare: Callable[[Any], list[np.ndarray]]
    run: Callable[[Sequence[np.ndarray]], _Arrays]
    # The queue, in columns: a fold reads numbers and latencies as arrays. Touching one
    # Python object per prediction was most of a fold's cost, as each inference leaves the
    # caches cold. Requests append under `lock`; a fold swaps in empty columns under it.
    numbers: array[int] = field(default_factory=lambda: array("q"))
    latencies: array[float] = field(default_factory=lambda: array("d"))
    outputs: list[_Arrays] = field(default_factory=list)
    samples: list[_Arrays] = field(default_factory=list)
    sample_bytes: int = 0
    input_bytes: int = 0  # one sample's inputs as the runner takes them
    next_sample_at: float = -math.inf  # on the perf_counter clock; infinity: never
    retired: bool = False  # replaced as the active model; set under the switch lock

    def take(self) -> tuple[array[int], array[float], list[_Arrays], list[_Arrays]]:
        """The queue's columns as they stand, leaving empty ones in their place."""
        with self.lock:
            taken = self.numbers, self.latencies, self.outputs, self.samples
            self.numbers, self.latencies = array("q"), array("d")
            self.outputs, self.samples = [], []
            self.sample_bytes = 0
        return taken

    @classmethod
    def of(cls, model: LoadedModel) -> _Slot:
        runner = model.runner
        input_bytes = sum(
            math.prod(info.shape) * _real_dtype(info).itemsize for info in runner.inputs
        )
        return cls(
            model, _lock_for(runner), _preparer(runner), runner.hot_path(), input_bytes=input_bytes
        )


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


def _preparer(runner: ModelRunner) -> Callable[[Any], list[np.ndarray]]:
    """_prepare for this runner, with a shortcut for the usual request: one array, already
    of the input's dtype and shape (with or without the batch axis)."""
    if len(runner.inputs) != 1:
        return lambda inputs: _prepare(runner, inputs)
    info = runner.inputs[0]
    dtype, shape = _real_dtype(info), info.shape
    unbatched = shape[1:] if shape[:1] == (1,) else None

    def prepare(inputs: Any) -> list[np.ndarray]:
        # Not checked for C order: set_tensor copies a strided array correctly. An array of
        # the dtype in native byte order has the very dtype object; any other takes the
        # long way, which casts it.
        if type(inputs) is np.ndarray and inputs.dtype is dtype:
            if inputs.shape == shape:
                return [inputs]
            if inputs.shape == unbatched:
                return [inputs[None]]
        return _prepare(runner, inputs)

    return prepare


# --- remembering answers for feedback -------------------------------------------------------


@dataclass(frozen=True)
class _Issued:
    """What feedback needs to know about the model that answered, after it may have gone."""

    model_name: str
    model_version: str
    labels: tuple[str, ...] | None
    classes: int


class _Memory:
    """The top-1 answers of the last `size` predictions: prediction n sits at n % size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._numbers = np.zeros(size, dtype=np.int64)  # 0: empty (numbers start at 1)
        self._top1 = np.full(size, NO_CLASS, dtype=np.int64)
        self._issuers = np.zeros(size, dtype=np.int32)
        self._issued: list[_Issued] = []
        self._issuer_index: dict[tuple[str, str], int] = {}

    def store(self, model: LoadedModel, numbers: np.ndarray, top1: np.ndarray) -> None:
        if self.size == 0:
            return
        key = (model.name, model.version)
        index = self._issuer_index.get(key)
        if index is None:
            issued = _Issued(model.name, model.version, model.labels, model.classifier.classes)
            index = self._issuer_index[key] = len(self._issued)
            self._issued.append(issued)
        slots = numbers % self.size
        self._numbers[slots] = numbers
        self._top1[slots] = top1
        self._issuers[slots] = index

    def find(self, number: int) -> tuple[_Issued, int | None] | None:
        if self.size == 0:
            return None
        slot = number % self.size
        if self._numbers[slot] != number:
            return None
        top1 = int(self._top1[slot])
        return self._issued[self._issuers[slot]], (None if top1 == NO_CLASS else top1)


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
        """`max_remembered`: feedback is taken for the last this many predictions."""
        if max_remembered < 0:
            raise ValueError(f"max_remembered must not be negative, got {max_remembered}")
        self._observer = observer
        self._sample_interval = (
            observer.drift_sample_interval_s if observer is not None else math.inf
        )
        self._keeping = observer is not None or max_remembered > 0
        # A random prefix and a counter: ids unique across restarts and devices, at a
        # fraction of uuid4's cost (which reads the OS's randomness on every prediction).
        self._prefix = secrets.token_hex(8)
        self._id_pattern = re.compile(re.escape(self._prefix) + "([0-9a-f]{16})")
        self._numbers = itertools.count(1)
        # The active and shadow slots, swapped as one reference so a request reads both
        # without a lock; the lock only orders the writers.
        self._serving: tuple[_Slot | None, _Slot | None] = (None, None)
        self._switch = threading.Lock()
        self._queued: list[_Slot] = []  # slots whose predictions may await a fold
        self._fold_lock = threading.Lock()
        self._memory = _Memory(max_remembered)
        self._observer_failures: set[str] = set()
        self._shadow_failure_logged_for: LoadedModel | None = None

    @property
    def active(self) -> LoadedModel | None:
        slot = self._serving[0]
        return slot.model if slot is not None else None

    @property
    def shadow(self) -> LoadedModel | None:
        slot = self._serving[1]
        return slot.model if slot is not None else None

    def activate(self, model: LoadedModel | None) -> LoadedModel | None:
        """Answer every later request with `model` (None unloads); returns the previous one.

        Requests already running finish on the model they started with.
        """
        slot = _Slot.of(model) if model is not None else None
        if slot is not None and self._observer is None:
            slot.next_sample_at = math.inf  # nobody to hand the samples to
        with self._switch:
            previous, shadow = self._serving
            self._serving = (slot, shadow)
            if previous is not None:
                previous.retired = True
            if slot is not None and self._keeping:
                self._queued.append(slot)
        return previous.model if previous is not None else None

    def set_shadow(self, candidate: LoadedModel | None) -> None:
        """Run `candidate` beside the active model on every request (None stops it)."""
        slot = _Slot.of(candidate) if candidate is not None else None
        with self._switch:
            self._serving = (self._serving[0], slot)

    def predict(self, inputs: np.ndarray | Sequence[np.ndarray]) -> Prediction:
        """Run one sample on the active model.

        Raises NoModelError when nothing is loaded, InputShapeError for inputs of the wrong
        number, shape or dtype, and whatever the runtime raised when the invoke fails.
        """
        active, shadow = self._serving
        if active is None:
            raise NoModelError("no model is loaded")
        arrays = active.prepare(inputs)
        lock = active.lock
        failed = False
        lock.acquire()  # not `with`: on a small model its two method calls cost 0.5 %
        try:
            start = time.perf_counter()
            try:
                outputs = active.run(arrays)
            except Exception:
                failed = True
                raise
            latency_ms = (time.perf_counter() - start) * 1000.0
            number = next(self._numbers)
            if self._keeping:
                active.numbers.append(number)
                active.latencies.append(latency_ms)
                active.outputs.append(outputs)
                if start >= active.next_sample_at:
                    self._sample(active, arrays, start)
        finally:
            lock.release()
            if failed:  # told outside the lock: the observer may fold, which takes it
                self._notify("on_error", active.model)
        prediction = Prediction(active.model, outputs, latency_ms, number, self._prefix)
        if self._keeping:
            if active.retired:
                # Switched away while this request ran: a fold may already have passed
                # this slot for the last time, so this request folds it itself.
                with self._fold_lock:
                    self._fold_slot(active)
            elif len(active.outputs) >= FOLD_EVERY or active.sample_bytes >= FOLD_MAX_SAMPLE_BYTES:
                self._fold_unless_busy()
        if shadow is not None:
            self._run_shadow(prediction, shadow, inputs)
        return prediction

    def _sample(self, slot: _Slot, arrays: list[np.ndarray], now: float) -> None:
        slot.next_sample_at = now + self._sample_interval
        # A copy: the caller may reuse its buffer for the next frame before the fold.
        copies = (arrays[0].copy(),) if len(arrays) == 1 else tuple(a.copy() for a in arrays)
        slot.samples.append(copies)
        slot.sample_bytes += slot.input_bytes

    def _run_shadow(self, prediction: Prediction, shadow: _Slot, inputs: Any) -> None:
        candidate = shadow.model
        try:
            # Prepared again: the candidate may want another dtype (or, wrongly, shape).
            arrays = shadow.prepare(inputs)
            with shadow.lock:
                outputs = shadow.run(arrays)
            top1 = candidate.answer(outputs)[0]
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
        self._notify("on_shadow", prediction.model, candidate, prediction.top1, top1)

    # --- folding ---

    def fold(self) -> None:
        """Hand every prediction queued so far to feedback and to the observer. The agent
        calls this before each telemetry flush; requests call it as the queue fills."""
        with self._fold_lock:
            self._fold()

    def _fold_unless_busy(self) -> None:
        # A request that finds another one folding goes on: that fold, or the next, will
        # take what it queued.
        if self._fold_lock.acquire(blocking=False):
            try:
                self._fold()
            finally:
                self._fold_lock.release()

    def _fold(self) -> None:
        with self._switch:
            slots = [(slot, slot.retired) for slot in self._queued]
        for slot, _ in slots:
            self._fold_slot(slot)
        # A slot already retired before it was drained is done with: a request appending
        # to it after the drain began checks `retired` afterwards, sees it, and folds the
        # slot itself. (One retired only during the drain stays for the next fold.)
        done = {id(slot) for slot, retired in slots if retired}
        with self._switch:
            self._queued = [slot for slot in self._queued if id(slot) not in done]

    def _fold_slot(self, slot: _Slot) -> None:
        numbers, latencies, outputs, samples = slot.take()
        count = len(outputs)
        if count == 0:  # samples are taken only beside an answer
            return
        model = slot.model
        stacked = _stack_outputs(outputs)
        if stacked is not None:
            top1, confidence = model.classifier.many(stacked[0])
            nan = non_finite(stacked)
        else:
            top1, confidence, nan = _read_one_by_one(model, outputs)
        if len(numbers) == count:
            self._memory.store(model, np.frombuffer(numbers, dtype=np.int64), top1)
        else:
            # Only an exception between one request's appends (a KeyboardInterrupt) leaves
            # the columns uneven; which number goes with which answer is then unknown, so
            # feedback on them is refused as forgotten rather than judged against another.
            logger.warning(
                "%d predictions of %s %s were cut short while queued; feedback on them "
                "will not be taken",
                count,
                model.name,
                model.version,
            )
        if self._observer is not None:
            latencies_ms = np.frombuffer(latencies, dtype=np.float64)[:count]
            batch = PredictionBatch(latencies_ms, top1, confidence, nan, tuple(samples))
            self._notify("on_predictions", model, batch)

    # --- feedback ---

    def feedback(self, prediction_id: str, label: int | str) -> bool:
        """Tell the agent the true label of an earlier prediction; returns whether it was right.

        Raises UnknownPredictionError for an id never issued or already forgotten, and
        ValueError for a label that is out of range or not one of the model's labels.
        """
        match = (
            self._id_pattern.fullmatch(prediction_id) if isinstance(prediction_id, str) else None
        )
        found = None
        if match is not None:
            number = int(match.group(1), 16)
            with self._fold_lock:
                found = self._memory.find(number)
                if found is None:
                    self._fold()  # it may still be queued
                    found = self._memory.find(number)
        if found is None:
            raise UnknownPredictionError(
                f"prediction {prediction_id!r} is unknown or has been forgotten"
            )
        issued, top1 = found
        if top1 is None:
            raise ValueError(
                f"prediction {prediction_id!r} has no top-1 class to compare a label with"
            )
        correct = _label_index(label, issued) == top1
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


def _stack_outputs(group: list[_Arrays]) -> list[np.ndarray] | None:
    """Each output over the group, one flattened sample per row; None when there is nothing
    to stack or the sizes differ between predictions (dynamically shaped outputs)."""
    if not group or not group[0]:
        return None
    stacked = []
    for position, first in enumerate(group[0]):
        try:
            # Joining the buffers is the cheap concatenate: numpy's own works per array.
            # (numpy arrays are buffers; the stubs do not say so.)
            joined = b"".join(cast("list[bytes]", [outputs[position] for outputs in group]))
        except (BufferError, TypeError, ValueError):
            return None
        flat = np.frombuffer(joined, dtype=first.dtype)
        if flat.size != len(group) * first.size:
            return None
        stacked.append(flat.reshape(len(group), -1))
    return stacked


def _read_one_by_one(
    model: LoadedModel, group: list[_Arrays]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    answers = [model.answer(outputs) for outputs in group]
    top1 = np.array([NO_CLASS if t is None else t for t, _ in answers], dtype=np.int64)
    confidence = np.array([np.nan if c is None else c for _, c in answers], dtype=np.float64)
    nan = np.array([bool(non_finite([o[np.newaxis] for o in outputs])[0]) for outputs in group])
    return top1, confidence, nan.astype(bool)
