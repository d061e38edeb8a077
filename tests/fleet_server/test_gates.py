"""Gate evaluation as a pure function of counts and samples, judged as a table."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from fleet_server.rollouts.gates import (
    DeviceEvidence,
    GateResult,
    Gates,
    Reference,
    Verdict,
    evaluate,
    overall,
)
from fleet_server.rollouts.states import InstallResult, Phase

PASS, FAIL, WAIT = Verdict.PASS, Verdict.FAIL, Verdict.WAIT
SUCCEEDED, PENDING = InstallResult.SUCCEEDED, InstallResult.PENDING
FAILED, TIMED_OUT = InstallResult.FAILED, InstallResult.TIMED_OUT
NO_REFERENCE = Reference()
REFERENCE = Reference(mean_confidence=0.9, class_distribution=(0.5, 0.3, 0.2))


def device(n: int, install: InstallResult = SUCCEEDED, **figures: Any) -> DeviceEvidence:
    return DeviceEvidence(f"dev-{n}", install, **figures)


def wave(count: int, **figures: Any) -> list[DeviceEvidence]:
    return [device(i, **figures) for i in range(count)]


def only(
    gates: Gates, devices: list[DeviceEvidence], reference: Reference = NO_REFERENCE
) -> GateResult:
    [result] = evaluate(gates, devices, reference)
    return result


# --- install -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("installs", "min_devices", "expected"),
    [
        ([SUCCEEDED] * 5, 3, PASS),
        ([SUCCEEDED] * 4 + [PENDING], 3, WAIT),  # every device must be done to pass
        ([FAILED] + [PENDING] * 9, 3, WAIT),  # one early failure decides nothing
        ([FAILED, SUCCEEDED, SUCCEEDED] + [PENDING] * 7, 3, FAIL),  # 1/3 > 0.2
        ([FAILED, TIMED_OUT, FAILED] + [PENDING] * 7, 5, FAIL),  # 3/10 > 0.2, for sure
        ([FAILED] + [SUCCEEDED] * 4, 3, PASS),  # 0.2 is within the limit
        ([TIMED_OUT] + [SUCCEEDED] * 3, 3, FAIL),  # a timeout counts as a failure
        ([], 3, WAIT),
    ],
)
def test_install_failure_ratio(
    installs: list[InstallResult], min_devices: int, expected: Verdict
) -> None:
    gates = Gates(max_install_failure_ratio=0.2, min_devices=min_devices)
    devices = [device(i, install) for i, install in enumerate(installs)]
    result = only(gates, devices)
    assert result.verdict is expected
    assert result.gate == "install_failure_ratio"


def test_install_gate_reports_its_measure_and_evidence() -> None:
    gates = Gates(max_install_failure_ratio=0.5, min_devices=2)
    devices = [device(0, FAILED), device(1), device(2, PENDING)]
    result = only(gates, devices)
    assert (result.verdict, result.measured, result.evidence, result.needed) == (WAIT, 0.5, 2, 2)
    assert "1 failed" in result.describe()


# --- runtime -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "expected", "measured"),
    [
        (wave(3, predictions=100, errors=1), PASS, 0.01),
        (wave(3, predictions=100, errors=10), FAIL, 0.1),
        (wave(3, predictions=20, errors=10), WAIT, 0.5),  # 60 predictions: too few to judge
        (wave(1, predictions=1000, errors=500), WAIT, 0.5),  # one device: too few to judge
        ([device(0, predictions=100), device(1, FAILED), device(2, PENDING)], WAIT, 0.0),
    ],
)
def test_error_rate(devices: list[DeviceEvidence], expected: Verdict, measured: float) -> None:
    gates = Gates(max_error_rate=0.05, min_devices=2, min_predictions=100)
    result = only(gates, devices)
    assert result.verdict is expected
    assert result.measured == pytest.approx(measured)


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        (wave(2, predictions=100), PASS),
        (wave(2, predictions=10), WAIT),
        ([device(0, predictions=10, nan_outputs=1), device(1)], FAIL),  # one NaN is final
    ],
)
def test_nan_outputs(devices: list[DeviceEvidence], expected: Verdict) -> None:
    gates = Gates(max_nan_outputs=0, min_devices=2, min_predictions=100)
    assert only(gates, devices).verdict is expected


@pytest.mark.parametrize(
    ("pairs", "expected", "measured"),
    [
        ([(2.0, 2.0), (2.2, 2.0), (1.8, 2.0)], PASS, 1.0),
        ([(3.0, 2.0), (3.2, 2.0), (1.8, 2.0)], FAIL, 1.5),
        # One slow device among fast ones: the median device decides.
        ([(10.0, 2.0), (2.0, 2.0), (2.1, 2.0)], PASS, 1.05),
        ([(3.0, 2.0), (None, 2.0), (3.0, None)], WAIT, 1.5),  # one device has both figures
    ],
)
def test_latency_ratio_is_judged_per_device_against_its_own_previous_model(
    pairs: list[tuple[float | None, float | None]], expected: Verdict, measured: float
) -> None:
    gates = Gates(max_latency_ratio=1.2, min_devices=2, min_predictions=100)
    devices = [
        device(i, predictions=100, latency_p95_ms=new, previous_latency_p95_ms=old)
        for i, (new, old) in enumerate(pairs)
    ]
    result = only(gates, devices)
    assert result.verdict is expected
    assert result.measured == pytest.approx(measured)


# --- model -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("figures", "expected", "drop"),
    [
        (
            {"labelled": 100, "correct": 95, "previous_labelled": 100, "previous_correct": 97},
            PASS,
            0.02,
        ),
        (
            {"labelled": 100, "correct": 10, "previous_labelled": 100, "previous_correct": 97},
            FAIL,
            0.87,
        ),
        # Three labelled samples all wrong decide nothing.
        (
            {"labelled": 1, "correct": 0, "previous_labelled": 100, "previous_correct": 97},
            WAIT,
            0.97,
        ),
        # No labelled samples on the previous model: nothing to compare with.
        ({"labelled": 100, "correct": 10}, WAIT, None),
        # A better candidate is a negative drop.
        (
            {"labelled": 100, "correct": 99, "previous_labelled": 100, "previous_correct": 90},
            PASS,
            -0.09,
        ),
    ],
)
def test_accuracy_drop_against_the_previous_model_on_the_same_wave(
    figures: dict[str, int], expected: Verdict, drop: float | None
) -> None:
    gates = Gates(max_accuracy_drop=0.05, min_devices=3, min_labelled=50)
    result = only(gates, wave(3, **figures))
    assert result.verdict is expected
    if drop is None:
        assert result.measured is None
    else:
        assert result.measured == pytest.approx(drop)


@pytest.mark.parametrize(
    ("compared", "agreed", "expected"),
    [(100, 95, PASS), (100, 50, FAIL), (10, 0, WAIT)],
)
def test_shadow_agreement_is_the_only_model_gate_of_a_shadow_phase(
    compared: int, agreed: int, expected: Verdict
) -> None:
    gates = Gates(
        min_shadow_agreement=0.9,
        max_accuracy_drop=0.05,
        max_error_rate=0.01,
        min_devices=2,
        min_compared=100,
    )
    devices = wave(2, compared=compared, agreed=agreed)
    results = evaluate(gates, devices, NO_REFERENCE, phase=Phase.SHADOW)
    assert [(r.gate, r.verdict) for r in results] == [("shadow_agreement", expected)]
    # In the active phase the agreement gate is not judged, the others are.
    active = evaluate(gates, devices, NO_REFERENCE, phase=Phase.ACTIVE)
    assert [r.gate for r in active] == ["error_rate", "accuracy_drop"]


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [(0.88, PASS), (0.5, FAIL)],
)
def test_confidence_collapse_against_the_manifest_reference(
    confidence: float, expected: Verdict
) -> None:
    gates = Gates(max_confidence_drop=0.1, min_devices=2, min_predictions=100)
    devices = wave(2, confidence_sum=confidence * 100, confidence_count=100)
    result = only(gates, devices, REFERENCE)
    assert result.verdict is expected
    assert result.measured == pytest.approx(0.9 - confidence)
    assert only(gates, wave(2, confidence_sum=30.0, confidence_count=40), REFERENCE).verdict is WAIT


@pytest.mark.parametrize(
    ("counts", "expected", "shift"),
    [
        ((50, 30, 20), PASS, 0.0),
        ((100, 0, 0), FAIL, 0.5),  # everything in one class: a collapse
        ((5, 3, 2), WAIT, 0.0),
    ],
)
def test_class_distribution_collapse_against_the_manifest_reference(
    counts: tuple[int, ...], expected: Verdict, shift: float
) -> None:
    gates = Gates(max_class_shift=0.3, min_devices=2, min_predictions=100)
    result = only(gates, wave(2, class_counts=counts), REFERENCE)
    assert result.verdict is expected
    assert result.measured == pytest.approx(shift)


def test_reference_gates_need_the_reference() -> None:
    with pytest.raises(ValueError, match="mean_confidence"):
        evaluate(Gates(max_confidence_drop=0.1), wave(2), NO_REFERENCE)
    with pytest.raises(ValueError, match="class_distribution"):
        evaluate(Gates(max_class_shift=0.1), wave(2), NO_REFERENCE)


# --- together ----------------------------------------------------------------------------------


def test_overall_fails_on_any_failure_and_waits_on_any_wait() -> None:
    gates = Gates(
        max_install_failure_ratio=0.5,
        max_error_rate=0.01,
        max_accuracy_drop=0.05,
        min_devices=2,
        min_predictions=100,
        min_labelled=50,
    )
    good = wave(
        2, predictions=100, labelled=60, correct=58, previous_labelled=60, previous_correct=58
    )
    assert overall(evaluate(gates, good, NO_REFERENCE)) is PASS
    too_few_labels = [replace(d, labelled=10, correct=10) for d in good]
    assert overall(evaluate(gates, too_few_labels, NO_REFERENCE)) is WAIT
    erring = [replace(d, errors=50) for d in too_few_labels]
    assert overall(evaluate(gates, erring, NO_REFERENCE)) is FAIL


def test_no_gates_pass() -> None:
    assert evaluate(Gates(), wave(3), NO_REFERENCE) == []
    assert overall([]) is PASS
