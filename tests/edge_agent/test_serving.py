"""Predictor against real digits bundles: answers, model switches, shadow runs and feedback."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import threading
from typing import Any

import numpy as np
import pytest

from edge_agent import serving
from edge_agent.model import LoadedModel, Prediction
from edge_agent.runtime import InputShapeError, TensorInfo
from edge_agent.serving import NoModelError, Predictor, UnknownPredictionError
from tests.edge_agent.conftest import DigitsBundles
from tests.edge_agent.doubles import Recorder, failing_model, two_input_model

EVAL_SAMPLES = 200


# --- helpers -------------------------------------------------------------------------------


class BrokenObserver:
    """Every hook raises, as a buggy telemetry module might."""

    def on_prediction(
        self, model: LoadedModel, prediction: Prediction, inputs: list[np.ndarray]
    ) -> None:
        raise RuntimeError("telemetry bug in on_prediction")

    def on_error(self, model: LoadedModel) -> None:
        raise RuntimeError("telemetry bug in on_error")

    def on_shadow(
        self,
        active: LoadedModel,
        candidate: LoadedModel,
        active_top1: int | None,
        candidate_top1: int | None,
    ) -> None:
        raise RuntimeError("telemetry bug in on_shadow")

    def on_feedback(self, model_name: str, model_version: str, correct: bool) -> None:
        raise RuntimeError("telemetry bug in on_feedback")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data(digits: DigitsBundles) -> tuple[np.ndarray, np.ndarray]:
    with np.load(digits.eval_npz) as data:
        return data["x"][:EVAL_SAMPLES], data["y"][:EVAL_SAMPLES]


@pytest.fixture(scope="module")
def pair(v1: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return two_input_model(v1, tmp_path_factory.mktemp("pair"))


# --- answers --------------------------------------------------------------------------------


def test_predictions_agree_with_the_runner_and_are_accurate(
    predictor: Predictor, v1: LoadedModel, eval_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = eval_data
    correct = 0
    for sample, truth in zip(x, y, strict=True):
        prediction = predictor.predict(sample)
        expected = v1.runner.invoke_once([sample[np.newaxis]])
        assert len(prediction.outputs) == len(expected) == 1
        np.testing.assert_array_equal(prediction.outputs[0], expected[0])
        assert prediction.top1 == int(np.argmax(expected[0]))
        assert prediction.label == v1.manifest.labels[prediction.top1]  # type: ignore[index]
        assert prediction.confidence == pytest.approx(float(expected[0].max()))
        assert (prediction.model_name, prediction.model_version) == ("digits", "1.0.0")
        assert prediction.latency_ms >= 0.0
        correct += prediction.top1 == truth
    assert correct / len(y) >= 0.9


def test_every_prediction_gets_its_own_id(predictor: Predictor, eval_data: Any) -> None:
    x, _ = eval_data
    ids = {predictor.predict(x[0]).prediction_id for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_input_with_or_without_batch_axis_and_as_lists(
    predictor: Predictor, eval_data: Any
) -> None:
    sample = eval_data[0][3]
    assert sample.shape == (8, 8, 1)
    forms: list[Any] = [
        sample,
        sample[np.newaxis],
        sample.tolist(),
        sample[np.newaxis].tolist(),
        [sample],  # one array per input
        sample.astype(np.float64),
        (sample * 16).astype(np.int32) / 16,
    ]
    answers = [predictor.predict(form) for form in forms]
    for answer in answers[1:]:
        np.testing.assert_allclose(answer.outputs[0], answers[0].outputs[0], rtol=1e-6)
        assert answer.top1 == answers[0].top1


def test_observer_sees_each_prediction_with_its_inputs(
    predictor: Predictor, recorder: Recorder, v1: LoadedModel, eval_data: Any
) -> None:
    sample = eval_data[0][0]
    prediction = predictor.predict(sample)
    assert len(recorder.predictions) == 1
    model, seen, inputs = recorder.predictions[0]
    assert model is v1
    assert seen is prediction
    assert len(inputs) == 1
    assert inputs[0].shape == (1, 8, 8, 1)
    assert inputs[0].dtype == np.float32
    np.testing.assert_array_equal(inputs[0][0], sample)
    assert recorder.errors == []
    assert recorder.shadows == []


def test_outputs_cannot_be_changed_behind_the_observers_back(
    predictor: Predictor, eval_data: Any
) -> None:
    prediction = predictor.predict(eval_data[0][0])
    with pytest.raises(ValueError, match="read-only"):
        prediction.outputs[0][0, 0] = 5.0


def test_int8_model_answers_with_real_values(
    v2: LoadedModel, eval_data: tuple[np.ndarray, np.ndarray]
) -> None:
    assert v2.runner.inputs[0].dtype == "int8"
    assert v2.runner.outputs[0].dtype == "int8"
    predictor = Predictor()
    predictor.activate(v2)
    x, y = eval_data
    correct = 0
    for sample, truth in zip(x, y, strict=True):
        prediction = predictor.predict(sample)
        probabilities = prediction.outputs[0]
        assert probabilities.dtype == np.float32
        assert probabilities.shape == (1, 10)
        assert float(probabilities.min()) >= 0.0
        assert float(probabilities.max()) <= 1.0
        assert float(probabilities.sum()) == pytest.approx(1.0, abs=0.05)
        np.testing.assert_array_equal(probabilities, v2.runner.invoke_once([sample])[0])
        # A dequantized softmax misses 1.0 by up to half a step per class; still probabilities.
        assert prediction.confidence == pytest.approx(float(probabilities.max()))
        assert prediction.model_version == "2.0.0"
        correct += prediction.top1 == truth
    assert correct / len(y) >= 0.9


def test_two_input_model_takes_one_array_per_input(pair: LoadedModel) -> None:
    predictor = Predictor()
    predictor.activate(pair)
    features = {4: [0.5, -1.0, 2.0, 0.25], 3: [1.0, 0.0, -0.5]}
    # In the manifest's (and the runner's) input order, as lists and as arrays.
    as_lists: list[Any] = [features[info.shape[-1]] for info in pair.runner.inputs]
    as_arrays = [np.asarray(values, dtype=np.float32)[np.newaxis] for values in as_lists]
    expected = pair.runner.invoke_once(as_arrays)
    for form in (as_lists, as_arrays, tuple(as_arrays)):
        prediction = predictor.predict(form)
        np.testing.assert_array_equal(prediction.outputs[0], expected[0])
        assert prediction.outputs[0].shape == (1, 3)
        assert prediction.top1 == int(np.argmax(expected[0]))
        assert prediction.label == ("red", "green", "blue")[prediction.top1]
        assert prediction.confidence == pytest.approx(float(expected[0].max()))

    second = np.zeros(3, dtype=np.float32)
    with pytest.raises(InputShapeError, match="model takes 2 inputs, got 1"):
        predictor.predict([second])
    with pytest.raises(InputShapeError, match="sequence of 2 arrays"):
        predictor.predict(np.zeros((2, 4), dtype=np.float32))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (np.zeros((8, 8)), r"expects shape \(1, 8, 8, 1\) or \(8, 8, 1\), got \(8, 8\)"),
        (
            np.zeros((2, 8, 8, 1)),
            r"expects shape \(1, 8, 8, 1\) or \(8, 8, 1\), got \(2, 8, 8, 1\)",
        ),
        (np.zeros(64), r"expects shape \(1, 8, 8, 1\) or \(8, 8, 1\), got \(64,\)"),
        ([[1.0, 2.0], [3.0]], r"expects shape \(1, 8, 8, 1\).*ragged"),
        (np.full((8, 8, 1), "x"), "must be numeric, got dtype <U1"),
        ([[["a"] * 1] * 8] * 8, "must be numeric"),
        ([[[None]] * 8] * 8, "must be numeric, got dtype object"),
        ("seven", "must be numeric"),
    ],
)
def test_bad_inputs_raise_input_shape_error(
    predictor: Predictor, recorder: Recorder, inputs: Any, message: str
) -> None:
    with pytest.raises(InputShapeError, match=message):
        predictor.predict(inputs)
    # A caller's mistake says nothing about the model's health.
    assert recorder.errors == []
    assert recorder.predictions == []


def test_nan_inputs_reach_the_model(predictor: Predictor) -> None:
    sample = np.full((8, 8, 1), np.nan, dtype=np.float32)
    prediction = predictor.predict(sample)
    assert prediction.outputs[0].shape == (1, 10)


def test_no_model_raises_no_model_error(v1: LoadedModel) -> None:
    predictor = Predictor()
    assert predictor.active is None
    with pytest.raises(NoModelError):
        predictor.predict(np.zeros((8, 8, 1)))
    assert predictor.activate(v1) is None
    assert predictor.active is v1
    assert predictor.activate(None) is v1
    with pytest.raises(NoModelError):
        predictor.predict(np.zeros((8, 8, 1)))


# --- failures -------------------------------------------------------------------------------


def test_runner_failure_is_reported_and_raised(digits: DigitsBundles, recorder: Recorder) -> None:
    broken = failing_model(digits.v1.folder)
    predictor = Predictor(recorder)
    predictor.activate(broken)
    with pytest.raises(RuntimeError, match="tensor arena exhausted"):
        predictor.predict(np.zeros((8, 8, 1)))
    assert recorder.errors == [broken]
    assert recorder.predictions == []


def test_observer_failures_never_fail_requests_and_are_logged_once(
    v1: LoadedModel, v2: LoadedModel, eval_data: Any, caplog: pytest.LogCaptureFixture
) -> None:
    predictor = Predictor(BrokenObserver())
    predictor.activate(v1)
    predictor.set_shadow(v2)
    with caplog.at_level(logging.ERROR, logger="edge_agent.serving"):
        for sample in eval_data[0][:5]:
            prediction = predictor.predict(sample)
            assert isinstance(predictor.feedback(prediction.prediction_id, 3), bool)
    failures = [r.getMessage() for r in caplog.records if "observer" in r.getMessage()]
    assert len(failures) == 3  # on_prediction, on_shadow, on_feedback: once each
    assert {m.split()[2] for m in failures} == {"on_prediction", "on_shadow", "on_feedback"}


# --- switching models -----------------------------------------------------------------------


def test_switching_under_load_fails_no_request(
    v1: LoadedModel, v2: LoadedModel, eval_data: Any
) -> None:
    threads = 6
    predictor = Predictor()
    predictor.activate(v1)
    x = eval_data[0]
    switched = threading.Event()
    warmed_up = threading.Barrier(threads + 1)
    answers: list[tuple[bool, str]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        after_switch = 0
        count = 0
        try:
            while after_switch < 25:
                started_after_switch = switched.is_set()
                prediction = predictor.predict(x[(offset + count) % len(x)])
                with lock:
                    answers.append((started_after_switch, prediction.model_version))
                count += 1
                after_switch += started_after_switch
                if count == 10:
                    warmed_up.wait()
        except BaseException as exc:
            failures.append(exc)
            warmed_up.abort()

    workers = [threading.Thread(target=client, args=(i * 7,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    warmed_up.wait()
    previous = predictor.activate(v2)
    switched.set()
    for worker in workers:
        worker.join()

    assert failures == []
    assert previous is v1
    assert {version for _, version in answers} <= {"1.0.0", "2.0.0"}
    assert sum(version == "1.0.0" for _, version in answers) >= threads * 10
    after = [version for started_after, version in answers if started_after]
    assert len(after) == threads * 25
    assert set(after) == {"2.0.0"}


def test_switch_does_not_wait_for_an_inference_on_the_old_model(
    v1: LoadedModel, v2: LoadedModel
) -> None:
    predictor = Predictor()
    predictor.activate(v1)
    # Holding v1's interpreter lock stands in for an inference that is still running on it.
    done: list[Prediction] = []

    def switch_and_predict() -> None:
        predictor.activate(v2)
        done.append(predictor.predict(np.zeros((8, 8, 1))))

    # Holding v1's interpreter lock stands in for an inference that is still running on it.
    with serving._lock_for(v1.runner):
        switcher = threading.Thread(target=switch_and_predict)
        switcher.start()
        switcher.join(timeout=60)  # a deadlock guard, not a timing assertion
        assert not switcher.is_alive()
    assert [p.model_version for p in done] == ["2.0.0"]


# --- shadow ---------------------------------------------------------------------------------


def test_shadow_candidate_runs_but_the_active_model_answers(
    predictor: Predictor,
    recorder: Recorder,
    v1: LoadedModel,
    v2: LoadedModel,
    eval_data: Any,
) -> None:
    predictor.set_shadow(v2)
    assert predictor.shadow is v2
    x = eval_data[0][:50]
    predictions = [predictor.predict(sample) for sample in x]
    assert {p.model_version for p in predictions} == {"1.0.0"}
    assert len(recorder.shadows) == len(x)
    for prediction, sample, (active, candidate, active_top1, candidate_top1) in zip(
        predictions, x, recorder.shadows, strict=True
    ):
        assert active is v1
        assert candidate is v2
        assert active_top1 == prediction.top1
        assert candidate_top1 == int(np.argmax(v2.runner.invoke_once([sample])[0]))
    agreement = np.mean([a == c for _, _, a, c in recorder.shadows])
    assert agreement >= 0.9
    # Telemetry hears of the answer once; the candidate's run is reported only as a shadow.
    assert len(recorder.predictions) == len(x)

    predictor.set_shadow(None)
    predictor.predict(x[0])
    assert len(recorder.shadows) == len(x)


def test_failing_shadow_candidate_never_fails_the_request(
    predictor: Predictor,
    recorder: Recorder,
    digits: DigitsBundles,
    eval_data: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = failing_model(digits.v2.folder)
    predictor.set_shadow(broken)
    with caplog.at_level(logging.ERROR, logger="edge_agent.serving"):
        predictions = [predictor.predict(sample) for sample in eval_data[0][:3]]
    assert [p.model_version for p in predictions] == ["1.0.0"] * 3
    assert recorder.shadows == []
    assert recorder.errors == [broken] * 3
    assert len(recorder.predictions) == 3
    assert len([r for r in caplog.records if "shadow candidate" in r.getMessage()]) == 1


def test_shadow_with_other_inputs_fails_quietly(
    predictor: Predictor, recorder: Recorder, pair: LoadedModel, eval_data: Any
) -> None:
    predictor.set_shadow(pair)
    prediction = predictor.predict(eval_data[0][0])
    assert prediction.model_version == "1.0.0"
    assert recorder.errors == [pair]


def test_the_active_model_as_its_own_shadow_shares_one_interpreter_lock(
    v1: LoadedModel, recorder: Recorder, eval_data: Any
) -> None:
    predictor = Predictor(recorder)
    predictor.activate(v1)
    predictor.set_shadow(v1)
    prediction = predictor.predict(eval_data[0][0])
    assert recorder.shadows == [(v1, v1, prediction.top1, prediction.top1)]


# --- feedback -------------------------------------------------------------------------------


def test_feedback_by_index_and_by_label(
    predictor: Predictor, recorder: Recorder, eval_data: Any
) -> None:
    prediction = predictor.predict(eval_data[0][0])
    top1 = prediction.top1
    assert top1 is not None
    wrong = (top1 + 1) % 10
    assert predictor.feedback(prediction.prediction_id, top1) is True
    assert predictor.feedback(prediction.prediction_id, wrong) is False
    assert predictor.feedback(prediction.prediction_id, str(top1)) is True
    assert predictor.feedback(prediction.prediction_id, np.int64(wrong)) is False  # type: ignore[arg-type]
    assert recorder.feedback == [
        ("digits", "1.0.0", True),
        ("digits", "1.0.0", False),
        ("digits", "1.0.0", True),
        ("digits", "1.0.0", False),
    ]


def test_feedback_after_a_switch_is_judged_against_the_model_that_answered(
    predictor: Predictor, recorder: Recorder, v2: LoadedModel, eval_data: Any
) -> None:
    prediction = predictor.predict(eval_data[0][0])
    predictor.activate(v2)
    assert predictor.feedback(prediction.prediction_id, prediction.top1 or 0) is True
    assert recorder.feedback == [("digits", "1.0.0", True)]


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (10, r"label 10 is out of range: model digits 1\.0\.0 has classes 0 to 9"),
        (-1, "label -1 is out of range"),
        ("ten", "label 'ten' is not one of the labels of model digits 1.0.0"),
        (True, "not a boolean"),
        (3.0, "class index or a label string, got float"),
    ],
)
def test_feedback_with_a_bad_label_raises_value_error(
    predictor: Predictor, recorder: Recorder, eval_data: Any, label: Any, message: str
) -> None:
    prediction = predictor.predict(eval_data[0][0])
    with pytest.raises(ValueError, match=message):
        predictor.feedback(prediction.prediction_id, label)
    assert recorder.feedback == []


def test_feedback_for_an_unknown_or_forgotten_id(v1: LoadedModel, eval_data: Any) -> None:
    predictor = Predictor(max_remembered=2)
    predictor.activate(v1)
    with pytest.raises(UnknownPredictionError, match="'nope' is unknown"):
        predictor.feedback("nope", 1)
    first, second = (predictor.predict(s) for s in eval_data[0][:2])
    # Feedback counts as use, so `second` is now the least recently used.
    predictor.feedback(first.prediction_id, 0)
    third = predictor.predict(eval_data[0][2])
    with pytest.raises(UnknownPredictionError, match="unknown or has been forgotten"):
        predictor.feedback(second.prediction_id, 0)
    predictor.feedback(first.prediction_id, 0)
    predictor.feedback(third.prediction_id, 0)


# --- reading a classifier's output ----------------------------------------------------------

_INT8_SOFTMAX = TensorInfo("probabilities", 0, (1, 4), (-1, 4), "int8", 1 / 256, -128)


@pytest.mark.parametrize(
    ("output", "labels", "info", "expected"),
    [
        ([[0.1, 0.7, 0.2]], None, None, (1, 0.7, 3)),
        ([[2.0, -1.0, 0.5]], None, None, (0, None, 3)),  # logits
        ([[0.2, 0.9, 0.1]], None, None, (1, None, 3)),  # in [0, 1] but not a distribution
        ([[0.8]], ("no", "yes"), None, (1, 0.8, 2)),  # sigmoid
        ([[0.3]], ("no", "yes"), None, (0, 0.7, 2)),
        ([[0.5]], ("no", "yes"), None, (1, 0.5, 2)),
        ([[-2.0]], ("no", "yes"), None, (0, None, 2)),  # a single logit
        ([[3.0]], ("no", "yes"), None, (1, None, 2)),
        ([[0.4]], None, None, (None, None, 0)),  # regression
        (np.zeros((1, 4, 4)), None, None, (None, None, 0)),  # not one vector of scores
        ([[np.nan, 0.5]], None, None, (0, None, 2)),
        # Sums to 0.995: off by more than 1e-3, yet within half an int8 step per class.
        ([[0.5, 0.25, 0.125, 0.12]], None, _INT8_SOFTMAX, (0, 0.5, 4)),
        ([[0.5, 0.25, 0.125, 0.12]], None, None, (0, None, 4)),
    ],
)
def test_top1_and_confidence(
    output: Any, labels: tuple[str, ...] | None, info: TensorInfo | None, expected: Any
) -> None:
    top1, confidence, classes = serving._classify(np.asarray(output), labels, info)
    assert (top1, classes) == (expected[0], expected[2])
    if expected[1] is None:
        assert confidence is None
    else:
        assert confidence == pytest.approx(expected[1])
