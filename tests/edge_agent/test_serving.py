"""Predictor against real digits bundles: answers, model switches, shadow runs and feedback."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import threading
import time
from typing import Any

import numpy as np
import pytest

from common.litert import InputShapeError
from edge_agent import serving
from edge_agent.classify import NO_CLASS, Classifier
from edge_agent.loaded_model import LoadedModel, Prediction, PredictionBatch
from edge_agent.serving import NoModelError, Predictor, UnknownPredictionError
from protocol.manifest import TensorSpec
from tests.bundles import DigitsBundles
from tests.edge_agent.doubles import Recorder, failing_model, two_input_model

EVAL_SAMPLES = 200


# --- helpers -------------------------------------------------------------------------------


class BrokenObserver:
    """Every hook raises, as a buggy telemetry module might."""

    drift_sample_interval_s = 0.0

    def on_predictions(self, model: LoadedModel, batch: PredictionBatch) -> None:
        raise RuntimeError("telemetry bug in on_predictions")

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


def test_observer_gets_the_predictions_at_a_fold_with_copies_of_their_inputs(
    predictor: Predictor, recorder: Recorder, v1: LoadedModel, eval_data: Any
) -> None:
    x = eval_data[0][:20]
    buffer = np.array(x[0])
    predictions = []
    for sample in x:
        buffer[...] = sample  # one buffer reused for every request, as a camera loop does
        predictions.append(predictor.predict(buffer))
    assert recorder.batches == []  # queued, not yet folded

    predictor.fold()

    [(model, batch)] = recorder.batches
    assert model is v1
    assert len(batch) == len(x)
    assert batch.latencies_ms.tolist() == [p.latency_ms for p in predictions]
    assert batch.top1.tolist() == [p.top1 for p in predictions]
    confidences = [float(p.confidence or np.nan) for p in predictions]
    np.testing.assert_allclose(batch.confidence, confidences, rtol=1e-6)
    assert not batch.non_finite.any()
    assert len(batch.inputs) == len(x)  # the recorder asks for every input
    for sampled, sample in zip(batch.inputs, x, strict=True):
        [array] = sampled
        assert array.shape == (1, 8, 8, 1)
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array[0], sample)
    assert recorder.errors == []
    assert recorder.shadows == []
    predictor.fold()
    assert len(recorder.batches) == 1  # nothing is handed over twice


def test_a_full_queue_folds_on_the_request_that_fills_it(
    predictor: Predictor, recorder: Recorder, eval_data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "FOLD_EVERY", 8)
    for sample in eval_data[0][:20]:
        predictor.predict(sample)
    assert [len(batch) for _, batch in recorder.batches] == [8, 8]
    predictor.fold()
    assert recorder.predicted() == 20


def test_sampled_inputs_past_their_byte_bound_fold_at_once(
    predictor: Predictor, recorder: Recorder, eval_data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One digits sample is 256 bytes: the bound is reached by the first sampled input.
    monkeypatch.setattr(serving, "FOLD_MAX_SAMPLE_BYTES", 256)
    predictor.predict(eval_data[0][0])
    assert [len(batch) for _, batch in recorder.batches] == [1]


def test_outputs_of_differing_sizes_are_read_one_by_one(
    predictor: Predictor, recorder: Recorder, v1: LoadedModel, eval_data: Any
) -> None:
    """A model whose output size varies (as a dynamically shaped one's may) cannot be
    stacked; each prediction is then read on its own, and one that does not match the
    manifest's width names no class."""
    answered = predictor.predict(eval_data[0][0])
    slot = predictor._serving[0]
    assert slot is not None
    odd = np.array([[np.nan, 0.2, 0.3]], dtype=np.float32)
    slot.numbers.append(answered.number + 1)
    slot.latencies.append(0.5)
    slot.outputs.append((odd,))
    predictor.fold()
    [(_, batch)] = recorder.batches
    assert batch.top1.tolist() == [answered.top1, NO_CLASS]
    assert batch.non_finite.tolist() == [False, True]
    assert np.isnan(batch.confidence[1])


def test_inputs_are_sampled_for_drift_at_most_once_per_interval(
    v1: LoadedModel, recorder: Recorder, eval_data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Far longer than the requests between which no sample is expected take, and far
    # shorter than the sleep after them.
    monkeypatch.setattr(recorder, "drift_sample_interval_s", 1.0)
    predictor = Predictor(recorder)
    predictor.activate(v1)
    x = eval_data[0][:12]
    for sample in x[:10]:
        predictor.predict(sample)
    time.sleep(1.1)
    for sample in x[10:]:
        predictor.predict(sample)
    predictor.fold()
    [(_, batch)] = recorder.batches
    assert len(batch) == 12
    assert len(batch.inputs) == 2
    for (array,), i in zip(batch.inputs, (0, 10), strict=True):
        np.testing.assert_array_equal(array[0], x[i])


def test_no_input_is_copied_without_an_observer_to_take_it(v1: LoadedModel, eval_data: Any) -> None:
    predictor = Predictor(None)
    predictor.activate(v1)
    predictor.predict(eval_data[0][0])
    slot = predictor._serving[0]
    assert slot is not None
    assert slot.samples == []
    assert len(slot.outputs) == 1  # kept for feedback all the same


def test_a_prediction_ending_on_a_replaced_model_after_its_last_fold_is_folded(
    predictor: Predictor, recorder: Recorder, v1: LoadedModel, v2: LoadedModel, eval_data: Any
) -> None:
    slot = predictor._serving[0]
    assert slot is not None
    prepared, go_on = threading.Event(), threading.Event()
    prepare = slot.prepare

    def pausing_prepare(inputs: Any) -> list[np.ndarray]:
        prepared.set()
        assert go_on.wait(60)
        return prepare(inputs)

    slot.prepare = pausing_prepare
    answers: list[Prediction] = []
    # The request has taken v1 as the model to answer with, and is held before its
    # inference while the model is replaced and a fold drains v1's queue for the last time.
    worker = threading.Thread(target=lambda: answers.append(predictor.predict(eval_data[0][0])))
    worker.start()
    assert prepared.wait(60)
    predictor.activate(v2)
    predictor.fold()
    assert recorder.batches == []
    go_on.set()
    worker.join(60)
    assert [a.model_version for a in answers] == ["1.0.0"]
    assert [(model, len(batch)) for model, batch in recorder.batches] == [(v1, 1)]


def test_predictions_queued_on_a_replaced_model_are_folded_as_that_model(
    predictor: Predictor, recorder: Recorder, v1: LoadedModel, v2: LoadedModel, eval_data: Any
) -> None:
    x = eval_data[0]
    for sample in x[:5]:
        predictor.predict(sample)
    predictor.activate(v2)
    for sample in x[5:8]:
        predictor.predict(sample)
    predictor.fold()
    assert [(model, len(batch)) for model, batch in recorder.batches] == [(v1, 5), (v2, 3)]
    predictor.fold()
    assert recorder.predicted() == 8


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
    predictor.fold()
    assert recorder.predicted() == 0


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
    predictor.fold()
    assert recorder.predicted() == 0


def test_an_observer_may_fold_when_told_of_a_failed_inference(
    digits: DigitsBundles, recorder: Recorder
) -> None:
    """on_error is called once the request has let go of the interpreter's lock, which a
    fold takes: an observer that folds there must not hang the request."""
    broken = failing_model(digits.v1.folder)
    predictor = Predictor(recorder)
    predictor.activate(broken)
    folds: list[LoadedModel] = []
    tell = recorder.on_error

    def on_error(model: LoadedModel) -> None:
        predictor.fold()
        folds.append(model)
        tell(model)

    recorder.on_error = on_error  # type: ignore[method-assign]
    failures: list[BaseException] = []

    def request() -> None:
        try:
            predictor.predict(np.zeros((8, 8, 1)))
        except RuntimeError as exc:
            failures.append(exc)

    worker = threading.Thread(target=request, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    assert [str(exc) for exc in failures] == ["tensor arena exhausted"]
    assert folds == [broken]
    assert recorder.errors == [broken]


def test_queue_columns_left_uneven_by_an_interrupt_are_counted_but_not_judged(
    predictor: Predictor, recorder: Recorder, eval_data: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A KeyboardInterrupt between a request's appends leaves a number without its
    answer: the fold still counts every answer, and refuses feedback on them rather than
    judge one request's answer under another's id."""
    slot = predictor._serving[0]
    assert slot is not None
    first = predictor.predict(eval_data[0][0])
    slot.numbers.append(first.number + 1)  # the interrupted request got this far
    second = predictor.predict(eval_data[0][1])
    with caplog.at_level(logging.WARNING, logger="edge_agent.serving"):
        predictor.fold()
    assert recorder.predicted() == 2
    assert "2 predictions of digits 1.0.0 were cut short" in caplog.text
    for answered in (first, second):
        with pytest.raises(UnknownPredictionError):
            predictor.feedback(answered.prediction_id, 0)
    third = predictor.predict(eval_data[0][2])  # the next fold's columns are even again
    assert isinstance(predictor.feedback(third.prediction_id, 0), bool)


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
    assert len(failures) == 3  # on_predictions, on_shadow, on_feedback: once each
    assert {m.split()[2] for m in failures} == {"on_predictions", "on_shadow", "on_feedback"}


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


def test_requests_from_many_threads_beside_folds_are_each_folded_once_with_their_answer(
    v1: LoadedModel, recorder: Recorder, eval_data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "FOLD_EVERY", 16)
    predictor = Predictor(recorder)
    predictor.activate(v1)
    x = eval_data[0]
    threads, per_thread = 4, 150
    answers: list[Prediction] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def client(offset: int) -> None:
        try:
            mine = [predictor.predict(x[(offset + i) % len(x)]) for i in range(per_thread)]
            answers.extend(mine)
        except BaseException as exc:
            failures.append(exc)

    def folder() -> None:
        while not done.is_set():
            predictor.fold()

    folding = threading.Thread(target=folder)
    folding.start()
    workers = [threading.Thread(target=client, args=(i * 31,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    folding.join()
    predictor.fold()

    assert failures == []
    assert len(answers) == threads * per_thread
    assert recorder.predicted() == threads * per_thread
    assert len({a.number for a in answers}) == threads * per_thread
    # Feedback is judged against the top-1 answer the fold stored under each number.
    wrong = [
        a.prediction_id
        for a in answers
        if a.top1 is None or not predictor.feedback(a.prediction_id, a.top1)
    ]
    assert wrong == []


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
    predictor.fold()
    assert [(model, len(batch)) for model, batch in recorder.batches] == [(v1, len(x))]

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
    predictor.fold()
    assert recorder.predicted() == 3
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
    first, second, third = (predictor.predict(s) for s in eval_data[0][:3])
    # Only the last two are remembered, folded or not.
    with pytest.raises(UnknownPredictionError, match="unknown or has been forgotten"):
        predictor.feedback(first.prediction_id, 0)
    predictor.feedback(second.prediction_id, 0)
    predictor.fold()
    predictor.feedback(third.prediction_id, 0)
    # An id of the right form from another agent (or an earlier run of this one).
    other = Predictor()
    other.activate(v1)
    foreign = other.predict(eval_data[0][0]).prediction_id
    with pytest.raises(UnknownPredictionError, match="unknown or has been forgotten"):
        predictor.feedback(foreign, 0)
    forged = third.prediction_id[:16] + f"{third.number + 1:016x}"
    with pytest.raises(UnknownPredictionError):
        predictor.feedback(forged, 0)


def test_nothing_is_remembered_with_max_remembered_zero(v1: LoadedModel, eval_data: Any) -> None:
    predictor = Predictor(max_remembered=0)
    predictor.activate(v1)
    prediction = predictor.predict(eval_data[0][0])
    with pytest.raises(UnknownPredictionError):
        predictor.feedback(prediction.prediction_id, 0)


# --- reading a classifier's output ----------------------------------------------------------

_INT8_SOFTMAX = TensorSpec("probabilities", (-1, 4), "int8", 1 / 256, -128)


def classifier(
    output: Any, labels: tuple[str, ...] | None, spec: TensorSpec | None
) -> tuple[Classifier, np.ndarray]:
    array = np.asarray(output, dtype=np.float32)
    spec = spec or TensorSpec("y", (-1, *array.shape[1:]), "float32")
    return Classifier.for_output(spec, labels), array


@pytest.mark.parametrize(
    ("output", "labels", "spec", "expected"),
    [
        ([[0.1, 0.7, 0.2]], None, None, (1, 0.7, 3)),
        ([[2.0, -1.0, 0.5]], None, None, (0, None, 3)),  # logits
        ([[0.2, 0.9, 0.1]], None, None, (1, None, 3)),  # in [0, 1] but not a distribution
        ([[0.8]], ("no", "yes"), None, (1, 0.8, 2)),  # sigmoid
        ([[0.3]], ("no", "yes"), None, (0, 0.7, 2)),
        ([[0.5]], ("no", "yes"), None, (1, 0.5, 2)),
        ([[-2.0]], ("no", "yes"), None, (0, None, 2)),  # a single logit
        ([[3.0]], ("no", "yes"), None, (1, None, 2)),
        ([[3.0]], ("yes",), None, (0, None, 2)),  # one label: not a logit
        ([[np.nan]], ("no", "yes"), None, (0, None, 2)),
        ([[0.4]], None, None, (None, None, 0)),  # regression
        (np.zeros((1, 4, 4)), None, None, (None, None, 0)),  # not one vector of scores
        ([[np.nan, 0.5]], None, None, (0, None, 2)),
        ([[0.5, np.inf, 0.1]], None, None, (1, None, 3)),
        ([[0.1, 0.7, 0.2]], ("a", "b"), None, (1, 0.7, 2)),  # labels decide the classes
        # Sums to 0.995: off by more than 1e-3, yet within half an int8 step per class.
        ([[0.5, 0.25, 0.125, 0.12]], None, _INT8_SOFTMAX, (0, 0.5, 4)),
        ([[0.5, 0.25, 0.125, 0.12]], None, None, (0, None, 4)),
    ],
)
def test_top1_and_confidence(
    output: Any, labels: tuple[str, ...] | None, spec: TensorSpec | None, expected: Any
) -> None:
    reader, array = classifier(output, labels, spec)
    top1, confidence = reader.one(array)
    assert (top1, reader.classes) == (expected[0], expected[2])
    if expected[1] is None:
        assert confidence is None
    else:
        assert confidence == pytest.approx(expected[1])
    # The batch reading agrees, alone and among other samples.
    stack = np.concatenate([array, array, array])
    many_top1, many_confidence = reader.many(stack)
    assert many_top1.tolist() == [NO_CLASS if top1 is None else top1] * 3
    if confidence is None:
        assert np.isnan(many_confidence).all()
    else:
        np.testing.assert_allclose(many_confidence, confidence, rtol=1e-6)


def test_one_and_many_agree_on_real_and_random_outputs(v1: LoadedModel, v2: LoadedModel) -> None:
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        logits = rng.normal(0, 5, (300, 10)).astype(np.float32)
        softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    odd = rng.choice([0.0, 1.0, -1.0, np.nan, np.inf, 0.5], size=(100, 10)).astype(np.float32)
    for model in (v1, v2):
        reader = model.classifier
        outputs = np.concatenate([logits, softmax, odd])
        real = np.concatenate(
            [model.runner.invoke_once([rng.random((1, 8, 8, 1), np.float32)])[0] for _ in range(50)]
        )
        for stack in (outputs, real):
            top1, confidence = reader.many(stack)
            for row, t, c in zip(stack, top1.tolist(), confidence.tolist(), strict=True):
                one = reader.one(row[np.newaxis])
                assert one[0] == (None if t == NO_CLASS else t)
                assert (one[1] is None) == np.isnan(c)
                if one[1] is not None:
                    assert one[1] == pytest.approx(c, rel=1e-6)
