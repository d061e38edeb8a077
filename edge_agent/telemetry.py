"""Inference telemetry: what the served models did, window by window.

`TelemetryCollector` is the `PredictionObserver` serving hands its predictions to, in
batches (`PredictionBatch`). A batch is added with a few numpy operations under one lock
(the histogram of the sampled inputs is made before taking it); everything that sorts or
divides happens in `flush`, once per telemetry window.

Latencies are kept in a reservoir (Vitter's algorithm R) of at most `max_latency_samples`
per model and window: the percentiles are exact while a window holds fewer inferences, and
an unbiased sample of them beyond that, so memory stays bounded however busy the device.

Drift compares each window's inputs with the reference statistics edge-convert recorded in
the manifest (`toolchain.reference.reference_stats`): the histogram of every input value on
the reference's own bin edges, scored with the population stability index (see
`population_stability_index`), and the running mean per feature or per channel, reported as
`mean_shift` in `summary`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.classify import Classifier
from protocol.manifest import Manifest, ReferenceStats, check_name, semver_key
from protocol.messages import AccuracyWindow, InferenceStats, ShadowStats

if TYPE_CHECKING:
    from edge_agent.loaded_model import LoadedModel, PredictionBatch

DEFAULT_ROLLING_WINDOW = 500
DEFAULT_MAX_LATENCY_SAMPLES = 10_000
# Drift is estimated from a sample of the inputs spaced in time: the copy and the histogram
# cost about half an inference on a small model. At most 200 a second describe a window's
# distribution well and keep that cost bounded at any load, while a device answering a few
# requests a second has every input counted.
DRIFT_SAMPLE_INTERVAL_S = 0.005
PSI_EPSILON = 1e-4
# window_s must be positive; a flush at (or, with a stepped clock, before) the window's
# start still reports what it saw.
MIN_WINDOW_S = 1e-6
# A feature that never varied on the reference data (an image border) has std 0; its
# shift is measured against this fraction of the reference value range instead.
STD_FLOOR_OF_RANGE = 0.01

ModelKey = tuple[str, str]  # (name, version)
FlushResult = tuple[tuple[InferenceStats, ...], tuple[AccuracyWindow, ...], tuple[ShadowStats, ...]]


def population_stability_index(
    live: np.ndarray, reference: np.ndarray, epsilon: float = PSI_EPSILON
) -> float | None:
    """PSI = sum_i (p_i - q_i) * ln(p_i / q_i) over the histogram bins, where p_i and q_i
    are the live and reference counts each divided by their own total, and a bin whose
    proportion is 0 counts as `epsilon` so that the logarithm stays finite.

    Every term is >= 0, and 0 only where the proportions agree. The usual reading: below
    0.1 the inputs look like the reference, 0.1-0.25 a moderate shift, above 0.25 a large
    one. None when either histogram is empty.
    """
    live_total, ref_total = float(live.sum()), float(reference.sum())
    if live_total <= 0 or ref_total <= 0:
        return None
    p = np.maximum(live / live_total, epsilon)
    q = np.maximum(reference / ref_total, epsilon)
    # max(): rounding must not push a sum of non-negative terms below the contract's 0.
    return max(float(np.sum((p - q) * np.log(p / q))), 0.0)


# --- what a model's manifest fixes ----------------------------------------------------


@dataclass(frozen=True)
class _ModelInfo:
    classes: int  # 0: not a classifier, class_counts is ()
    reference: ReferenceStats | None
    edges: np.ndarray | None  # the reference histogram's edges, when it has a usable one
    ref_counts: np.ndarray | None
    uniform: bool  # the edges are evenly spaced (np.histogram's own, with a bin count)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> _ModelInfo:
        reference = manifest.reference
        edges = counts = None
        if reference is not None and len(reference.histogram_counts) > 0:
            edges = np.asarray(reference.histogram_edges, dtype=np.float64)
            counts = np.asarray(reference.histogram_counts, dtype=np.float64)
        # Classes are counted as serving reads them: 0 for a model that is no classifier.
        uniform = (
            edges is not None
            and edges[-1] > edges[0]
            and bool(
                np.allclose(np.diff(edges), (edges[-1] - edges[0]) / (len(edges) - 1), rtol=1e-6)
            )
        )
        return cls(Classifier.for_manifest(manifest).classes, reference, edges, counts, uniform)


# --- what one prediction contributes, computed outside the lock -----------------------


@dataclass(frozen=True)
class _InputSummary:
    histogram: np.ndarray
    feature_sums: np.ndarray | None  # None when the input cannot be read per feature
    rows: int


def _bin_indices(values: np.ndarray, edges: np.ndarray, uniform: bool) -> np.ndarray:
    """np.histogram's bins, [e_i, e_i+1) with the last one closed, with out-of-range values
    in the edge bins. `values` holds no NaN."""
    bins = len(edges) - 1
    if not uniform:
        # Counting the inner edges at or below a value is the bin's index.
        found: np.ndarray = np.searchsorted(edges[1:-1], values, side="right")
        return found
    # Even bins, as np.histogram does them: the index by arithmetic, then one step back or
    # on where rounding put a value beside its bin's edges. A third the cost of searching.
    clipped = np.clip(values, edges[0], edges[-1])
    index: np.ndarray = ((clipped - edges[0]) * (bins / (edges[-1] - edges[0]))).astype(np.intp)
    np.minimum(index, bins - 1, out=index)
    index -= clipped < edges[index]
    index += (clipped >= edges[index + 1]) & (index < bins - 1)
    return index


def _summarise_inputs(
    info: _ModelInfo, samples: tuple[tuple[np.ndarray, ...], ...]
) -> _InputSummary | None:
    """The first input of every sample, binned and summed together."""
    if info.edges is None or info.reference is None or not samples or not samples[0]:
        return None
    if any(sample[0].dtype.kind not in "biuf" for sample in samples):
        return None
    flat = np.concatenate([sample[0] for sample in samples], axis=None).astype(np.float64)
    finite = bool(np.isfinite(flat).all())
    # Out-of-range values (infinities too) land in the edge bins; NaN has no bin at all.
    binned = flat if finite else flat[~np.isnan(flat)]
    bins = len(info.edges) - 1
    histogram = np.bincount(_bin_indices(binned, info.edges, info.uniform), minlength=bins)
    width = len(info.reference.mean)
    if not finite or width == 0 or flat.size % width:
        return _InputSummary(histogram, None, 0)
    # C order puts channels last, so (-1, C) lines channels up as the toolchain's
    # reshape does; per feature, a sample with or without its batch axis is one row.
    rows = flat.size // width
    return _InputSummary(histogram, flat.reshape(rows, width).sum(axis=0), rows)


# --- per-model state -------------------------------------------------------------------


@dataclass
class _Window:
    """One model's inference since the last flush."""

    classes: int
    predictions: int = 0
    errors: int = 0
    latencies: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the reservoir
    latencies_kept: int = 0
    latencies_seen: int = 0
    confidence_sum: float = 0.0
    confidences: int = 0
    class_counts: list[int] = field(default_factory=list)
    nan_outputs: int = 0
    histogram: np.ndarray | None = None
    feature_sums: np.ndarray | None = None
    feature_rows: int = 0

    def __post_init__(self) -> None:
        self.class_counts = [0] * self.classes

    def add_latencies(self, latencies_ms: np.ndarray, bound: int, rng: np.random.Generator) -> None:
        """Algorithm R over the batch: the k-th latency seen replaces a random one of the
        `bound` kept with probability bound / k."""
        values = np.maximum(latencies_ms[np.isfinite(latencies_ms)], 0.0)
        if len(self.latencies) < bound:
            self.latencies = np.resize(self.latencies, bound)
        room = min(bound - self.latencies_kept, len(values))
        self.latencies[self.latencies_kept : self.latencies_kept + room] = values[:room]
        self.latencies_kept += room
        rest = values[room:]
        seen = self.latencies_seen + room
        self.latencies_seen += len(values)
        if len(rest) == 0:
            return
        # For the j-th of the rest, a uniform slot in [0, seen + j + 1); where two land on
        # one slot, numpy's assignment keeps the later, as the sequential algorithm would.
        slots = (rng.random(len(rest)) * (seen + np.arange(1, len(rest) + 1))).astype(np.int64)
        kept = slots < bound
        self.latencies[slots[kept]] = rest[kept]

    def add_batch(self, batch: PredictionBatch) -> int:
        """Counts a batch of predictions; returns how many had a non-finite output."""
        nan = int(np.count_nonzero(batch.non_finite))
        self.predictions += len(batch)
        self.nan_outputs += nan
        confidence = batch.confidence[np.isfinite(batch.confidence)]
        self.confidence_sum += float(np.clip(confidence, 0.0, 1.0).sum())
        self.confidences += len(confidence)
        top1 = batch.top1[(batch.top1 >= 0) & (batch.top1 < self.classes)]
        if len(top1):
            counts = np.bincount(top1, minlength=self.classes).tolist()
            self.class_counts = [a + b for a, b in zip(self.class_counts, counts, strict=True)]
        return nan

    def add_input(self, summary: _InputSummary) -> None:
        if self.histogram is None:
            self.histogram = summary.histogram.copy()
        else:
            self.histogram += summary.histogram
        if summary.feature_sums is None:
            return
        if self.feature_sums is None:
            self.feature_sums = summary.feature_sums.copy()
        else:
            self.feature_sums += summary.feature_sums
        self.feature_rows += summary.rows


@dataclass
class _Totals:
    """One model since the collector started, for `summary`."""

    predictions: int = 0
    errors: int = 0
    nan_outputs: int = 0
    drift_score: float | None = None
    mean_shift: float | None = None


class _Rolling:
    """The last `size` labelled results, with their number correct kept as they slide."""

    def __init__(self, size: int) -> None:
        self.results: deque[bool] = deque(maxlen=size)
        self.correct = 0

    def add(self, correct: bool) -> None:
        if len(self.results) == self.results.maxlen:
            self.correct -= self.results[0]
        self.results.append(correct)
        self.correct += correct

    def accuracy(self) -> float | None:
        return self.correct / len(self.results) if self.results else None


@dataclass
class _Tally:
    total: int = 0
    hits: int = 0


@dataclass
class _Pending:
    """Everything a flush takes away."""

    start: float
    windows: dict[ModelKey, _Window] = field(default_factory=dict)
    accuracy: dict[ModelKey, _Tally] = field(default_factory=dict)
    shadow: dict[tuple[str, str], _Tally] = field(default_factory=dict)


# --- the collector ---------------------------------------------------------------------


class TelemetryCollector:
    """Counts what serving reports, per model version; `flush` turns it into messages.

    Implements `edge_agent.loaded_model.PredictionObserver`. Every method is thread-safe.
    """

    def __init__(
        self,
        *,
        rolling_window: int = DEFAULT_ROLLING_WINDOW,
        max_latency_samples: int = DEFAULT_MAX_LATENCY_SAMPLES,
        start: float | None = None,
        seed: int | None = None,
        drift_sample_interval_s: float = DRIFT_SAMPLE_INTERVAL_S,
    ) -> None:
        """`start` opens the first window (default: now); `seed` fixes the reservoir;
        drift statistics take at most one input per `drift_sample_interval_s`."""
        if min(rolling_window, max_latency_samples) < 1:
            raise ValueError("rolling_window and max_latency_samples must be at least 1")
        if not drift_sample_interval_s >= 0.0:  # NaN too
            raise ValueError(
                f"drift_sample_interval_s must be 0 or more, got {drift_sample_interval_s}"
            )
        self.drift_sample_interval_s = drift_sample_interval_s
        self.rolling_window = rolling_window
        self.max_latency_samples = max_latency_samples
        self.started_at = time.time() if start is None else start
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self._pending = _Pending(self.started_at)
        self._infos: dict[ModelKey, _ModelInfo] = {}
        self._totals: dict[ModelKey, _Totals] = {}
        self._rolling: dict[ModelKey, _Rolling] = {}

    # --- PredictionObserver ---

    def on_predictions(self, model: LoadedModel, batch: PredictionBatch) -> None:
        key = (model.name, model.version)
        info = self._info(key, model.manifest)
        summary = _summarise_inputs(info, batch.inputs)
        with self._lock:
            window = self._window(key, info)
            nan = window.add_batch(batch)
            window.add_latencies(batch.latencies_ms, self.max_latency_samples, self._rng)
            if summary is not None:
                window.add_input(summary)
            totals = self._totals_for(key)
            totals.predictions += len(batch)
            totals.nan_outputs += nan

    def on_error(self, model: LoadedModel) -> None:
        key = (model.name, model.version)
        info = self._info(key, model.manifest)
        with self._lock:
            self._window(key, info).errors += 1
            self._totals_for(key).errors += 1

    def on_shadow(
        self,
        active: LoadedModel,
        candidate: LoadedModel,
        active_top1: int | None,
        candidate_top1: int | None,
    ) -> None:
        """Agreement is equal top-1 answers: two Nones agree, a None and a class do not."""
        key = (active.version, candidate.version)
        with self._lock:
            tally = self._pending.shadow.setdefault(key, _Tally())
            tally.total += 1
            tally.hits += active_top1 == candidate_top1

    def on_feedback(self, model_name: str, model_version: str, correct: bool) -> None:
        """Raises ValueError for a name or version no manifest could have."""
        # Checked here, not at flush: one bad key would otherwise cost the whole batch.
        check_name(model_name)
        semver_key(model_version)
        key = (model_name, model_version)
        with self._lock:
            tally = self._pending.accuracy.setdefault(key, _Tally())
            tally.total += 1
            tally.hits += correct
            rolling = self._rolling.get(key)
            if rolling is None:
                rolling = self._rolling[key] = _Rolling(self.rolling_window)
            rolling.add(correct)

    # --- reading ---

    def flush(self, now: float) -> FlushResult:
        """Messages for everything since the previous flush (or construction); then a new
        window starts at `now`. Sorted by model name and version."""
        with self._lock:
            pending, self._pending = self._pending, _Pending(now)
        window_s = max(now - pending.start, MIN_WINDOW_S)
        inference = tuple(
            self._inference_stats(key, window, now, window_s)
            for key, window in sorted(pending.windows.items())
        )
        accuracy = tuple(
            AccuracyWindow(now, name, version, window_s, tally.total, tally.hits)
            for (name, version), tally in sorted(pending.accuracy.items())
        )
        shadow = tuple(
            ShadowStats(now, active, candidate, tally.total, tally.hits)
            for (active, candidate), tally in sorted(pending.shadow.items())
        )
        return inference, accuracy, shadow

    def rolling_accuracy(self, name: str, version: str) -> float | None:
        """Accuracy over the last `rolling_window` labelled results; None before any."""
        with self._lock:
            rolling = self._rolling.get((name, version))
            return None if rolling is None else rolling.accuracy()

    def latency_samples(self, name: str, version: str) -> int:
        """How many latencies the current window holds (at most `max_latency_samples`)."""
        with self._lock:
            window = self._pending.windows.get((name, version))
            return 0 if window is None else window.latencies_kept

    def summary(self) -> dict[str, Any]:
        """For the local health API: per model version seen since start, its counts, rolling
        accuracy and the drift measured at the last flush (None before one with inputs)."""
        with self._lock:
            keys = sorted(self._totals.keys() | self._rolling.keys())
            models = [self._model_summary(key) for key in keys]
            return {"started_at": self.started_at, "models": models}

    # --- internals ---

    def _info(self, key: ModelKey, manifest: Manifest) -> _ModelInfo:
        # A dict read is atomic under the GIL; only a miss, once per version, takes the lock.
        info = self._infos.get(key)
        if info is None:
            built = _ModelInfo.from_manifest(manifest)
            with self._lock:
                info = self._infos.setdefault(key, built)
        return info

    def _window(self, key: ModelKey, info: _ModelInfo) -> _Window:
        window = self._pending.windows.get(key)
        if window is None:
            window = self._pending.windows[key] = _Window(info.classes)
        return window

    def _totals_for(self, key: ModelKey) -> _Totals:
        totals = self._totals.get(key)
        if totals is None:
            totals = self._totals[key] = _Totals()
        return totals

    def _model_summary(self, key: ModelKey) -> dict[str, Any]:
        totals = self._totals.get(key, _Totals())
        rolling = self._rolling.get(key)
        return {
            "name": key[0],
            "version": key[1],
            "predictions": totals.predictions,
            "errors": totals.errors,
            "nan_outputs": totals.nan_outputs,
            "rolling_accuracy": None if rolling is None else rolling.accuracy(),
            "labelled": 0 if rolling is None else len(rolling.results),
            "drift_score": totals.drift_score,
            "mean_shift": totals.mean_shift,
        }

    def _inference_stats(
        self, key: ModelKey, window: _Window, now: float, window_s: float
    ) -> InferenceStats:
        info = self._infos[key]
        drift = _drift_score(info, window)
        shift = _mean_shift(info, window)
        if drift is not None or shift is not None:
            with self._lock:
                totals = self._totals_for(key)
                totals.drift_score = drift if drift is not None else totals.drift_score
                totals.mean_shift = shift if shift is not None else totals.mean_shift
        p50, p95, p99 = _percentiles(window.latencies[: window.latencies_kept])
        confidence = window.confidence_sum / window.confidences if window.confidences else None
        return InferenceStats(
            ts=now,
            model_name=key[0],
            model_version=key[1],
            window_s=window_s,
            count=window.predictions + window.errors,
            errors=window.errors,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            latency_p99_ms=p99,
            mean_confidence=None if confidence is None else min(max(confidence, 0.0), 1.0),
            class_counts=tuple(window.class_counts),
            nan_outputs=window.nan_outputs,
            drift_score=drift,
        )


def _percentiles(latencies: np.ndarray) -> tuple[float, float, float]:
    """p50, p95, p99 with numpy's linear interpolation, as the benchmark reports them.

    A window of failures only has no latency, yet the contract wants one whenever count
    is positive: it reports 0.0, as no inference completed.
    """
    if len(latencies) == 0:
        return 0.0, 0.0, 0.0
    p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
    # Interpolation may round p95 an ulp past p99; the contract wants them ordered.
    p95 = max(p95, p50)
    return p50, p95, max(p99, p95)


def _drift_score(info: _ModelInfo, window: _Window) -> float | None:
    if info.ref_counts is None or window.histogram is None:
        return None
    return population_stability_index(window.histogram.astype(np.float64), info.ref_counts)


def _mean_shift(info: _ModelInfo, window: _Window) -> float | None:
    """The largest |live mean - reference mean| / reference std over features (or channels).

    A std is floored at STD_FLOOR_OF_RANGE of the reference value range, so a feature the
    reference never saw vary does not divide by zero.
    """
    reference = info.reference
    if reference is None or window.feature_sums is None or window.feature_rows == 0:
        return None
    live = window.feature_sums / window.feature_rows
    floor = max(STD_FLOOR_OF_RANGE * (reference.max - reference.min), 1e-12)
    scale = np.maximum(np.asarray(reference.std, dtype=np.float64), floor)
    shift = np.abs(live - np.asarray(reference.mean, dtype=np.float64)) / scale
    return float(shift.max())
