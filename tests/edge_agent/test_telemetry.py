"""TelemetryCollector: window statistics, accuracy, shadow agreement and drift.

Most tests observe made-up predictions of models described by hand-written manifests; the
end-to-end tests run real digits bundles and send the result through the wire codec.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from common.litert import ModelRunner
from edge_agent.classify import NO_CLASS, non_finite
from edge_agent.loaded_model import LoadedModel, PredictionBatch, PredictionObserver, load_model
from edge_agent.serving import Predictor
from edge_agent.telemetry import (
    MIN_WINDOW_S,
    PSI_EPSILON,
    TelemetryCollector,
    _bin_indices,
    population_stability_index,
)
from protocol.manifest import Manifest
from protocol.messages import (
    MESSAGE_SCHEMA_VERSION,
    InferenceStats,
    TelemetryBatch,
    decode_payload,
    encode_payload,
)
from protocol.schema import decode
from tests.bundles import DigitsBundles

REPO_ROOT = Path(__file__).resolve().parents[2]
START = 1_790_000_000.0


# --- models described by hand ---------------------------------------------------------


def reference(
    edges: list[float],
    counts: list[int],
    mean: list[float],
    std: list[float],
    granularity: str = "feature",
) -> dict[str, Any]:
    return {
        "samples": sum(counts),
        "granularity": granularity,
        "mean": mean,
        "std": std,
        "min": edges[0],
        "max": edges[-1],
        "histogram_edges": edges,
        "histogram_counts": counts,
    }


def model(
    version: str = "1.0.0",
    *,
    name: str = "digits",
    labels: tuple[str, ...] | None = ("a", "b", "c"),
    output_shape: tuple[int, ...] = (-1, 3),
    ref: dict[str, Any] | None = None,
) -> LoadedModel:
    manifest = decode(
        Manifest,
        {
            "schema_version": 1,
            "name": name,
            "version": version,
            "created_at": "2026-01-01T00:00:00Z",
            "model": {"path": "model.tflite", "sha256": "0" * 64, "size": 1},
            "source": {"format": "keras", "sha256": "1" * 64, "conversion_path": "keras"},
            "inputs": [{"name": "x", "shape": [-1, 2], "dtype": "float32"}],
            "outputs": [{"name": "y", "shape": list(output_shape), "dtype": "float32"}],
            "quantization": {"mode": "float32", "integer_only": False},
            "labels": None if labels is None else list(labels),
            "toolchain": {"edgefleet": "0.1.0", "tensorflow": "2.16.1", "validated_with": "x"},
            "runtime": {"min_runtime_version": None, "ops": [], "requires_flex": False},
            "validation": None,
            "benchmark": None,
            "reference": ref,
            "self_test": None,
        },
    )
    # The collector reads only the manifest: observing predictions needs no runtime.
    return LoadedModel(cast(ModelRunner, None), manifest, Path("unused"))


def observe(
    collector: TelemetryCollector,
    m: LoadedModel,
    inputs: list[np.ndarray] | None = None,
    *,
    latency_ms: float = 1.0,
    top1: int | None = 0,
    confidence: float | None = 0.9,
    non_finite: bool = False,
) -> None:
    """One prediction, handed over as serving hands its folds: a batch of one."""
    x = [np.zeros((1, 2), dtype=np.float32)] if inputs is None else inputs
    batch = PredictionBatch(
        latencies_ms=np.array([latency_ms]),
        top1=np.array([NO_CLASS if top1 is None else top1]),
        confidence=np.array([np.nan if confidence is None else confidence]),
        non_finite=np.array([non_finite]),
        inputs=(tuple(x),),
    )
    collector.on_predictions(m, batch)


def only_stats(collector: TelemetryCollector, now: float) -> InferenceStats:
    inference, _, _ = collector.flush(now)
    assert len(inference) == 1
    return inference[0]


# --- the contract ---------------------------------------------------------------------


def test_collector_is_a_prediction_observer() -> None:
    # mypy checks the assignment: the collector is a PredictionObserver.
    observer: PredictionObserver = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    assert callable(observer.on_predictions)


def test_agent_modules_import_nothing_heavy() -> None:
    code = (
        "import sys, edge_agent.telemetry, edge_agent.health\n"
        "heavy = {'tensorflow', 'fastapi', 'pydantic', 'sqlalchemy', 'psutil', 'keras'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- inference statistics ---------------------------------------------------------------


def test_percentiles_are_exact_on_known_latencies() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model()
    latencies = [float(v) for v in range(1, 101)]
    random.Random(0).shuffle(latencies)
    for latency in latencies:
        observe(collector, m, latency_ms=latency)

    stats = only_stats(collector, START + 60.0)

    # numpy's linear interpolation between the closest ranks of 1..100.
    assert stats.latency_p50_ms == pytest.approx(50.5)
    assert stats.latency_p95_ms == pytest.approx(95.05)
    assert stats.latency_p99_ms == pytest.approx(99.01)
    assert (stats.count, stats.errors, stats.window_s, stats.ts) == (100, 0, 60.0, START + 60.0)
    assert (stats.model_name, stats.model_version) == ("digits", "1.0.0")


def test_class_counts_and_mean_confidence() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model(labels=("a", "b", "c"))
    for top1, confidence in [(0, 0.5), (2, 0.7), (2, 0.9), (1, 0.6), (2, 0.8)]:
        observe(collector, m, top1=top1, confidence=confidence)
    observe(collector, m, top1=None, confidence=None)  # no answer to count
    observe(collector, m, top1=7, confidence=None)  # a class the labels do not have

    stats = only_stats(collector, START + 1.0)

    assert stats.class_counts == (1, 1, 3)
    assert stats.count == 7
    assert stats.mean_confidence == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("labels", "output_shape", "top1", "expected"),
    [
        (None, (-1, 5), 4, (0, 0, 0, 0, 1)),  # K class scores
        (None, (-1, 1, 5), 4, (0, 0, 0, 0, 1)),  # still one vector per sample
        (None, (-1, 1), None, ()),  # one unlabelled score: maybe a regressor
        (None, (-1, 4, 4), None, ()),  # a map, not a class vector
        (("yes",), (-1, 1), 1, (0, 1)),  # one labelled score: a binary classifier
        (("a", "b", "c"), (-1, 5), 4, (0, 0, 0)),  # labels decide; class 4 is not counted
    ],
)
def test_class_counts_length_follows_serving(
    labels: tuple[str, ...] | None,
    output_shape: tuple[int, ...],
    top1: int | None,
    expected: tuple[int, ...],
) -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model(labels=labels, output_shape=output_shape)
    observe(collector, m, top1=top1, confidence=None)

    stats = only_stats(collector, START + 1.0)

    assert stats.class_counts == expected
    assert stats.mean_confidence is None


def test_nan_and_infinite_outputs_are_counted() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model()
    for flagged in (True, True, False, False):
        observe(collector, m, non_finite=flagged)

    assert only_stats(collector, START + 1.0).nan_outputs == 2


def test_non_finite_flags_each_sample_with_any_nan_or_infinity() -> None:
    nan = np.array([[np.nan, 0.5, 0.5], [0.1, 0.2, 0.7], [0.5, 0.5, 0.0]], dtype=np.float32)
    second = np.array([[0.0], [-np.inf], [1.0]], dtype=np.float32)
    ints = np.array([[3], [0], [0]], dtype=np.int8)  # integers have no NaN
    assert non_finite([nan, second, ints]).tolist() == [True, True, False]


def test_errors_are_counted_in_count() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model()
    for _ in range(3):
        observe(collector, m, latency_ms=2.0)
    collector.on_error(m)
    collector.on_error(m)

    stats = only_stats(collector, START + 1.0)

    assert (stats.count, stats.errors) == (5, 2)
    assert stats.latency_p50_ms == pytest.approx(2.0)


def test_a_window_of_errors_only_still_satisfies_the_contract() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    collector.on_error(model())

    stats = only_stats(collector, START + 1.0)

    # Latencies are required once count > 0; no inference completed, so they are 0.
    assert (stats.count, stats.errors) == (1, 1)
    assert (stats.latency_p50_ms, stats.latency_p95_ms, stats.latency_p99_ms) == (0.0, 0.0, 0.0)
    assert stats.mean_confidence is None
    assert stats.class_counts == (0, 0, 0)
    assert stats.drift_score is None


def test_latency_store_stays_bounded() -> None:
    collector = TelemetryCollector(start=START, seed=0, drift_sample_interval_s=0.0)
    m = model()
    for i in range(50_000):
        observe(collector, m, latency_ms=float(i))

    assert collector.latency_samples("digits", "1.0.0") == 10_000
    stats = only_stats(collector, START + 1.0)
    assert stats.count == 50_000
    # A uniform sample of 0..49999: its percentiles land near the true ones.
    assert stats.latency_p50_ms == pytest.approx(25_000, rel=0.03)
    assert stats.latency_p99_ms == pytest.approx(49_500, rel=0.01)
    assert collector.latency_samples("digits", "1.0.0") == 0


def test_odd_latencies_and_confidences_are_kept_in_range() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model()
    observe(collector, m, latency_ms=-0.5, confidence=1.0000001)
    observe(collector, m, latency_ms=math.nan, confidence=math.nan)
    observe(collector, m, latency_ms=3.0, confidence=1.0)

    stats = only_stats(collector, START + 1.0)

    assert stats.count == 3
    assert stats.latency_p50_ms == pytest.approx(1.5)  # from 0.0 and 3.0
    assert stats.mean_confidence == 1.0


def test_flush_resets_the_window() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model()
    observe(collector, m)
    collector.on_feedback("digits", "1.0.0", True)
    collector.on_shadow(m, model("2.0.0"), 1, 1)
    first = collector.flush(START + 10.0)
    assert [len(part) for part in first] == [1, 1, 1]

    assert collector.flush(START + 20.0) == ((), (), ())

    observe(collector, m)
    stats = only_stats(collector, START + 35.0)
    assert stats.count == 1
    assert stats.window_s == pytest.approx(15.0)  # since the previous flush


def test_window_is_positive_when_the_clock_does_not_advance() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    observe(collector, model())
    collector.on_feedback("digits", "1.0.0", False)

    inference, accuracy, _ = collector.flush(START - 5.0)

    assert inference[0].window_s == MIN_WINDOW_S
    assert accuracy[0].window_s == MIN_WINDOW_S


def test_several_threads_add_up() -> None:
    collector = TelemetryCollector(
        start=START, max_latency_samples=500, drift_sample_interval_s=0.0
    )
    models = [model("1.0.0"), model("2.0.0")]
    per_thread = 2_000
    barrier = threading.Barrier(8)

    def work(index: int) -> None:
        m = models[index % 2]
        barrier.wait()
        for i in range(per_thread):
            observe(collector, m, latency_ms=float(i % 50), top1=i % 3)
            if i % 10 == 0:
                collector.on_error(m)
                collector.on_feedback(m.name, m.version, i % 20 == 0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    inference, accuracy, _ = collector.flush(START + 1.0)

    for stats in inference:
        assert stats.count == 4 * (per_thread + per_thread // 10)
        assert stats.errors == 4 * per_thread // 10
        assert sum(stats.class_counts) == 4 * per_thread
    assert [(a.labelled, a.correct) for a in accuracy] == [(800, 400), (800, 400)]
    summary = collector.summary()
    assert [s["predictions"] for s in summary["models"]] == [4 * per_thread] * 2


# --- accuracy and shadow ----------------------------------------------------------------


def test_accuracy_windows_per_version() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    for correct in (True, True, False, True):
        collector.on_feedback("digits", "1.0.0", correct)
    collector.on_feedback("digits", "2.0.0-rc.1", False)

    _, accuracy, _ = collector.flush(START + 30.0)

    assert [(a.model_version, a.labelled, a.correct, a.window_s) for a in accuracy] == [
        ("1.0.0", 4, 3, 30.0),
        ("2.0.0-rc.1", 1, 0, 30.0),
    ]


def test_rolling_accuracy_slides_over_the_last_results() -> None:
    collector = TelemetryCollector(start=START, rolling_window=4, drift_sample_interval_s=0.0)
    assert collector.rolling_accuracy("digits", "1.0.0") is None
    for correct in (False, False, True, True):
        collector.on_feedback("digits", "1.0.0", correct)
    assert collector.rolling_accuracy("digits", "1.0.0") == 0.5

    collector.flush(START + 1.0)  # the rolling figure outlives windows
    collector.on_feedback("digits", "1.0.0", True)
    collector.on_feedback("digits", "1.0.0", True)

    assert collector.rolling_accuracy("digits", "1.0.0") == 1.0
    assert collector.rolling_accuracy("digits", "9.9.9") is None


def test_feedback_for_an_impossible_model_is_refused() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    with pytest.raises(ValueError, match="semver"):
        collector.on_feedback("digits", "latest", True)
    with pytest.raises(ValueError, match="name"):
        collector.on_feedback("../digits", "1.0.0", True)
    assert collector.flush(START + 1.0) == ((), (), ())


def test_shadow_agreement() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    active, candidate, other = model("1.2.0"), model("1.3.0-rc.1"), model("1.4.0")
    for a, c in [(1, 1), (2, 2), (2, 3), (None, None), (None, 4), (5, None)]:
        collector.on_shadow(active, candidate, a, c)
    collector.on_shadow(active, other, 0, 0)

    _, _, shadow = collector.flush(START + 1.0)

    assert [(s.active_version, s.candidate_version, s.compared, s.agreed) for s in shadow] == [
        ("1.2.0", "1.3.0-rc.1", 6, 3),
        ("1.2.0", "1.4.0", 1, 1),
    ]


# --- drift -------------------------------------------------------------------------------


def test_psi_formula() -> None:
    live, ref = np.array([3.0, 1.0]), np.array([50.0, 50.0])
    # (0.75 - 0.5) ln(1.5) + (0.25 - 0.5) ln(0.5) = 0.25 ln 3
    assert population_stability_index(live, ref) == pytest.approx(0.25 * math.log(3))
    assert population_stability_index(ref, ref) == 0.0
    # An empty bin counts as PSI_EPSILON.
    empty = population_stability_index(np.array([4.0, 0.0]), ref)
    e = PSI_EPSILON
    assert empty == pytest.approx(0.5 * math.log(2) + (e - 0.5) * math.log(e / 0.5))
    assert population_stability_index(np.zeros(2), ref) is None


def test_drift_bins_on_the_reference_edges() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model(ref=reference([0.0, 0.5, 1.0], [50, 50], mean=[0.5, 0.5], std=[0.1, 0.1]))
    # Outside values land in the edge bins, NaN nowhere: bins hold 3 and 1.
    observe(collector, m, [np.array([[0.25, -5.0]], dtype=np.float32)])
    observe(collector, m, [np.array([[0.25, 7.0]], dtype=np.float32)])
    observe(collector, m, [np.array([[np.nan, np.nan]], dtype=np.float32)])

    stats = only_stats(collector, START + 1.0)

    assert stats.drift_score == pytest.approx(0.25 * math.log(3))


def test_drift_is_none_without_reference_or_inputs() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    no_ref = model("1.0.0")
    with_ref = model("2.0.0", ref=reference([0.0, 1.0], [10], mean=[0.5, 0.5], std=[0.1, 0.1]))
    observe(collector, no_ref)
    collector.on_error(with_ref)
    observe(collector, with_ref, [])  # a model without inputs has nothing to compare

    inference, _, _ = collector.flush(START + 1.0)

    assert [s.drift_score for s in inference] == [None, None]


def test_mean_shift_per_feature_and_per_channel() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    per_feature = model("1.0.0", ref=reference([0.0, 1.0], [10], mean=[0.5, 0.5], std=[0.1, 0.0]))
    per_channel = model(
        "2.0.0",
        ref=reference([0.0, 1.0], [10], mean=[0.5, 0.5, 0.5], std=[0.1] * 3, granularity="channel"),
    )
    # Feature 0 averages 0.7, two reference stds off; feature 1 never moves.
    observe(collector, per_feature, [np.array([[0.6, 0.5]], dtype=np.float32)])
    observe(collector, per_feature, [np.array([[0.8, 0.5]], dtype=np.float32)])
    # (1, 2, 2, 3) channels-last image: channel 2 sits at 0.2, three stds below.
    image = np.full((1, 2, 2, 3), 0.5, dtype=np.float32)
    image[..., 2] = 0.2
    observe(collector, per_channel, [image])

    collector.flush(START + 1.0)
    shifts = {s["version"]: s["mean_shift"] for s in collector.summary()["models"]}

    assert shifts == {"1.0.0": pytest.approx(2.0), "2.0.0": pytest.approx(3.0)}


# --- summary ------------------------------------------------------------------------------


def test_summary_keeps_counts_since_start() -> None:
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)
    m = model(ref=reference([0.0, 0.5, 1.0], [50, 50], mean=[0.5, 0.5], std=[0.1, 0.1]))
    observe(collector, m, [np.array([[0.25, 0.75]], dtype=np.float32)])
    collector.on_error(m)
    collector.flush(START + 1.0)
    observe(collector, m, [np.array([[0.25, 0.75]], dtype=np.float32)])
    collector.on_feedback("digits", "1.0.0", True)
    collector.on_feedback("other", "3.0.0", False)

    summary = collector.summary()

    assert summary["started_at"] == START
    assert summary["models"] == [
        {
            "name": "digits",
            "version": "1.0.0",
            "predictions": 2,
            "errors": 1,
            "nan_outputs": 0,
            "rolling_accuracy": 1.0,
            "labelled": 1,
            "drift_score": 0.0,
            "mean_shift": pytest.approx(2.5),
        },
        {
            "name": "other",
            "version": "3.0.0",
            "predictions": 0,
            "errors": 0,
            "nan_outputs": 0,
            "rolling_accuracy": 0.0,
            "labelled": 1,
            "drift_score": None,
            "mean_shift": None,
        },
    ]


# --- real bundles --------------------------------------------------------------------------


def serve(collector: TelemetryCollector, m: LoadedModel, x: np.ndarray) -> list[int | None]:
    """Serving as the agent does it: every sample through a Predictor, folded at the end."""
    predictor = Predictor(collector)
    predictor.activate(m)
    answers = [predictor.predict(sample).top1 for sample in x]
    predictor.fold()
    return answers


def batch_round_trip(collector: TelemetryCollector, now: float) -> TelemetryBatch:
    inference, accuracy, shadow = collector.flush(now)
    batch = TelemetryBatch(MESSAGE_SCHEMA_VERSION, 1, now, 0, (), inference, accuracy, shadow)
    decoded = decode_payload(TelemetryBatch, encode_payload(batch))
    assert decoded == batch
    return decoded


@pytest.mark.slow
def test_real_predictions_flush_to_a_valid_batch(digits: DigitsBundles) -> None:
    v1, v2 = load_model(digits.v1.folder), load_model(digits.v2.folder)
    data = np.load(digits.eval_npz)
    x, y = data["x"].astype(np.float32), data["y"]
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)

    active = serve(collector, v1, x)
    candidate = serve(collector, v2, x)
    for a, c, truth in zip(active, candidate, y, strict=True):
        collector.on_shadow(v1, v2, a, c)
        collector.on_feedback(v1.name, v1.version, a == int(truth))
    batch = batch_round_trip(collector, START + 60.0)

    assert [(s.model_version, s.count) for s in batch.inference] == [
        ("1.0.0", len(x)),
        ("2.0.0", len(x)),
    ]
    for stats in batch.inference:
        assert len(stats.class_counts) == len(digits.labels)
        assert sum(stats.class_counts) == len(x)
        assert stats.nan_outputs == 0
        assert stats.mean_confidence is not None
        assert stats.mean_confidence > 0.5
        # Held-out digits look like the calibration digits the reference came from.
        assert stats.drift_score is not None
        assert stats.drift_score < 0.1
    (accuracy,) = batch.accuracy
    assert accuracy.labelled == len(x)
    assert accuracy.correct / accuracy.labelled > 0.8
    (shadow,) = batch.shadow
    assert (shadow.active_version, shadow.candidate_version) == ("1.0.0", "2.0.0")
    assert shadow.agreed / shadow.compared > 0.9
    recent = [a == int(truth) for a, truth in zip(active, y, strict=True)][-500:]
    assert collector.rolling_accuracy("digits", "1.0.0") == pytest.approx(np.mean(recent))


@pytest.mark.slow
def test_drift_is_large_on_shifted_inputs(digits: DigitsBundles) -> None:
    v1 = load_model(digits.v1.folder)
    x = np.load(digits.eval_npz)["x"].astype(np.float32)
    collector = TelemetryCollector(start=START, drift_sample_interval_s=0.0)

    serve(collector, v1, x[:100])
    (normal,) = batch_round_trip(collector, START + 60.0).inference
    serve(collector, v1, x[:100] * 0 + 1)
    (shifted,) = batch_round_trip(collector, START + 120.0).inference

    assert normal.drift_score is not None
    assert shifted.drift_score is not None
    assert normal.drift_score < 0.1
    assert shifted.drift_score > 1.0
    assert collector.summary()["models"][0]["drift_score"] == shifted.drift_score


def test_drift_is_measured_on_the_sampled_inputs_of_a_batch() -> None:
    collector = TelemetryCollector(start=START)
    m = model(ref=reference([0.0, 0.5, 1.0], [50, 50], mean=[0.5, 0.5], std=[0.1, 0.1]))
    # Eight predictions, of which serving sampled two inputs: both low.
    low = (np.array([[0.25, 0.25]], dtype=np.float32),)
    batch = PredictionBatch(
        latencies_ms=np.ones(8),
        top1=np.zeros(8, dtype=np.int64),
        confidence=np.full(8, 0.9),
        non_finite=np.zeros(8, dtype=bool),
        inputs=(low, low),
    )
    collector.on_predictions(m, batch)
    stats = only_stats(collector, START + 1.0)
    assert stats.count == 8
    only_low = population_stability_index(np.array([4, 0]), np.array([50, 50]))
    assert stats.drift_score == pytest.approx(only_low)


@pytest.mark.parametrize("interval", [-0.001, math.nan])
def test_a_drift_sample_interval_that_is_not_a_time_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="drift_sample_interval_s must be 0 or more"):
        TelemetryCollector(drift_sample_interval_s=interval)


def test_even_bins_by_arithmetic_match_a_search_of_the_edges() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        low, high = sorted(rng.normal(0.0, 10.0, 2))
        _, edges = np.histogram(rng.uniform(low, high, 50), bins=int(rng.integers(1, 40)))
        values = np.concatenate(
            [rng.uniform(low - 1.0, high + 1.0, 200), edges, [np.inf, -np.inf, low, high]]
        )
        searched = _bin_indices(values, edges, uniform=False)
        assert searched.tolist() == _bin_indices(values, edges, uniform=True).tolist()
        # Both are np.histogram's bins, out-of-range values in the edge bins.
        inside = values[(values >= edges[0]) & (values <= edges[-1])]
        counts = np.bincount(_bin_indices(inside, edges, uniform=True), minlength=len(edges) - 1)
        assert counts.tolist() == np.histogram(inside, bins=edges)[0].tolist()
