"""Whether a wave's evidence lets a rollout go on: a pure function of counts and samples.

Each gate is judged only on enough evidence (a minimum number of devices, and of
predictions, labelled samples or shadow comparisons), so that one early failure or three
labelled samples decide nothing: short of it the gate says WAIT. The exception is a bound
that the rest of the wave can no longer bring back within the limit (more install
failures than the ratio allows over the whole wave, a NaN output where none is allowed):
that fails at once, as no later evidence can change the outcome.

The controller gathers a `DeviceEvidence` per device of the wave from the database and
acts on `overall(evaluate(...))`; nothing here reads a clock or a database, so the rules
are tested as a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from annotated_types import Ge, Gt, Le

from fleet_server.rollouts.states import InstallResult, Phase

# Gates whose threshold is a minimum to reach; every other gate's is a maximum.
AT_LEAST = frozenset({"shadow_agreement"})


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"  # not enough evidence yet


# Each threshold's bounds, checked where a rollout request comes in (pydantic reads them).
Share = Annotated[float, Ge(0), Le(1)]
Drop = Annotated[float, Ge(-1), Le(1)]  # negative: the candidate must be better by this much
Minimum = Annotated[int, Ge(1)]


@dataclass(frozen=True)
class Gates:
    """Every threshold is optional; a gate left None is not judged. The one definition of
    the gates, their bounds and their defaults (`spec.GateThresholds` takes them from a
    request as they are)."""

    max_install_failure_ratio: Share | None = None
    max_error_rate: Share | None = None
    max_nan_outputs: Annotated[int, Ge(0)] | None = None  # 0: "no NaN or infinite outputs"
    # p95 on the candidate / p95 on the previous model
    max_latency_ratio: Annotated[float, Gt(0)] | None = None
    max_accuracy_drop: Drop | None = None  # previous accuracy - candidate accuracy
    min_shadow_agreement: Share | None = None
    max_confidence_drop: Drop | None = None  # reference mean confidence - live
    max_class_shift: Share | None = None  # total variation distance from the reference
    # Minimum evidence.
    min_devices: Minimum = 1
    min_predictions: Minimum = 100
    min_labelled: Minimum = 50
    min_compared: Minimum = 100


@dataclass(frozen=True)
class DeviceEvidence:
    """One device of a wave: its install outcome and what it reported since.

    The candidate's figures count from the device's switch to it; `previous_*` are the same
    device's figures on the model it ran before, over a comparable span.
    """

    device_id: str
    install: InstallResult
    predictions: int = 0  # inferences attempted on the candidate, failed ones included
    errors: int = 0
    nan_outputs: int = 0
    latency_p95_ms: float | None = None
    previous_latency_p95_ms: float | None = None
    labelled: int = 0
    correct: int = 0
    previous_labelled: int = 0
    previous_correct: int = 0
    compared: int = 0  # shadow comparisons of the candidate with the active model
    agreed: int = 0
    confidence_sum: float = 0.0  # sum of mean confidence x predictions with a confidence
    confidence_count: int = 0
    class_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Reference:
    """What the candidate's manifest says its outputs looked like on its evaluation data."""

    mean_confidence: float | None = None
    class_distribution: tuple[float, ...] | None = None


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    measured: float | None  # None until there is anything to measure
    threshold: float
    evidence: int  # what the minimum applies to: devices, predictions, samples
    needed: int
    note: str

    def as_dict(self) -> dict[str, object]:
        return {
            "gate": self.gate,
            "verdict": str(self.verdict),
            "measured": self.measured,
            "threshold": self.threshold,
            "evidence": self.evidence,
            "needed": self.needed,
            "note": self.note,
        }

    def describe(self) -> str:
        measured = "n/a" if self.measured is None else f"{self.measured:.4g}"
        return (
            f"{self.gate} {self.verdict}: {measured} against {self.threshold:.4g}, "
            f"on {self.evidence} {self.note} (needs {self.needed})"
        )


def overall(results: Sequence[GateResult]) -> Verdict:
    """FAIL if any gate failed, else WAIT if any waits, else PASS (also with no gates)."""
    verdicts = {result.verdict for result in results}
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    if Verdict.WAIT in verdicts:
        return Verdict.WAIT
    return Verdict.PASS


def evaluate(
    gates: Gates,
    devices: Sequence[DeviceEvidence],
    reference: Reference,
    phase: Phase = Phase.ACTIVE,
) -> list[GateResult]:
    """Every configured gate that applies to the phase: in a shadow phase the candidate
    does not answer, so only the install and agreement gates are judged."""
    results: list[GateResult] = []
    if gates.max_install_failure_ratio is not None:
        results.append(_install(gates, gates.max_install_failure_ratio, devices))
    installed = [d for d in devices if d.install == InstallResult.SUCCEEDED]
    if phase == Phase.SHADOW:
        if gates.min_shadow_agreement is not None:
            results.append(_agreement(gates, gates.min_shadow_agreement, installed))
        return results
    if gates.max_error_rate is not None:
        results.append(_error_rate(gates, gates.max_error_rate, installed))
    if gates.max_nan_outputs is not None:
        results.append(_nan_outputs(gates, gates.max_nan_outputs, installed))
    if gates.max_latency_ratio is not None:
        results.append(_latency(gates, gates.max_latency_ratio, installed))
    if gates.max_accuracy_drop is not None:
        results.append(_accuracy(gates, gates.max_accuracy_drop, installed))
    if gates.max_confidence_drop is not None:
        results.append(_confidence(gates, gates.max_confidence_drop, installed, reference))
    if gates.max_class_shift is not None:
        results.append(_class_shift(gates, gates.max_class_shift, installed, reference))
    return results


# --- one function per gate --------------------------------------------------------------------


def _install(gates: Gates, limit: float, devices: Sequence[DeviceEvidence]) -> GateResult:
    total = len(devices)
    failed = sum(d.install in (InstallResult.FAILED, InstallResult.TIMED_OUT) for d in devices)
    finished = sum(d.install != InstallResult.PENDING for d in devices)
    needed = min(gates.min_devices, total)
    ratio = failed / finished if finished else None
    note = f"devices finished, {failed} failed or timed out"
    if total and failed / total > limit:
        verdict = Verdict.FAIL  # beyond the limit whatever the pending devices do
    elif finished < max(needed, 1):
        verdict = Verdict.WAIT
    elif ratio is not None and ratio > limit:
        verdict = Verdict.FAIL
    elif finished < total:
        verdict = Verdict.WAIT  # a wave passes its install gate only once every device is done
    else:
        verdict = Verdict.PASS
    return GateResult("install_failure_ratio", verdict, ratio, limit, finished, needed, note)


def _enough(devices: Sequence[DeviceEvidence], amount: int, gates: Gates, minimum: int) -> bool:
    return len(devices) >= gates.min_devices and amount >= minimum


def _error_rate(gates: Gates, limit: float, devices: Sequence[DeviceEvidence]) -> GateResult:
    reporting = [d for d in devices if d.predictions > 0]
    predictions = sum(d.predictions for d in reporting)
    errors = sum(d.errors for d in reporting)
    rate = errors / predictions if predictions else None
    return _judge(
        "error_rate",
        rate,
        limit,
        enough=_enough(reporting, predictions, gates, gates.min_predictions),
        evidence=predictions,
        needed=gates.min_predictions,
        note=f"predictions on {len(reporting)} device(s)",
    )


def _nan_outputs(gates: Gates, limit: int, devices: Sequence[DeviceEvidence]) -> GateResult:
    reporting = [d for d in devices if d.predictions > 0]
    predictions = sum(d.predictions for d in reporting)
    nan = sum(d.nan_outputs for d in reporting)
    if nan > limit:
        verdict = Verdict.FAIL  # a count that only grows: past the limit is final
    elif _enough(reporting, predictions, gates, gates.min_predictions):
        verdict = Verdict.PASS
    else:
        verdict = Verdict.WAIT
    note = f"predictions on {len(reporting)} device(s)"
    return GateResult(
        "nan_outputs", verdict, float(nan), limit, predictions, gates.min_predictions, note
    )


def _latency(gates: Gates, limit: float, devices: Sequence[DeviceEvidence]) -> GateResult:
    ratios = sorted(
        d.latency_p95_ms / d.previous_latency_p95_ms
        for d in devices
        if d.latency_p95_ms is not None
        and d.previous_latency_p95_ms is not None
        and d.previous_latency_p95_ms > 0
    )
    compared = [d for d in devices if d.latency_p95_ms is not None and d.previous_latency_p95_ms]
    predictions = sum(d.predictions for d in compared)
    # The median device: one slow device (a busy neighbour, a throttled CPU) decides nothing.
    ratio = _median(ratios) if ratios else None
    return _judge(
        "latency_p95_ratio",
        ratio,
        limit,
        enough=_enough(compared, predictions, gates, gates.min_predictions),
        evidence=predictions,
        needed=gates.min_predictions,
        note=f"predictions on {len(compared)} device(s) with both models' p95",
    )


def _accuracy(gates: Gates, limit: float, devices: Sequence[DeviceEvidence]) -> GateResult:
    labelled = sum(d.labelled for d in devices)
    previous_labelled = sum(d.previous_labelled for d in devices)
    drop = None
    if labelled and previous_labelled:
        previous = sum(d.previous_correct for d in devices) / previous_labelled
        drop = previous - sum(d.correct for d in devices) / labelled
    labelling = [d for d in devices if d.labelled > 0]
    evidence = min(labelled, previous_labelled)
    return _judge(
        "accuracy_drop",
        drop,
        limit,
        enough=_enough(labelling, evidence, gates, gates.min_labelled),
        evidence=evidence,
        needed=gates.min_labelled,
        note=(
            f"labelled samples on each model ({labelled} candidate, "
            f"{previous_labelled} previous) from {len(labelling)} device(s)"
        ),
    )


def _agreement(gates: Gates, limit: float, devices: Sequence[DeviceEvidence]) -> GateResult:
    comparing = [d for d in devices if d.compared > 0]
    compared = sum(d.compared for d in comparing)
    rate = sum(d.agreed for d in comparing) / compared if compared else None
    return _judge(
        "shadow_agreement",
        rate,
        limit,
        enough=_enough(comparing, compared, gates, gates.min_compared),
        evidence=compared,
        needed=gates.min_compared,
        note=f"comparisons on {len(comparing)} device(s)",
    )


def _confidence(
    gates: Gates, limit: float, devices: Sequence[DeviceEvidence], reference: Reference
) -> GateResult:
    if reference.mean_confidence is None:
        raise ValueError("the confidence gate needs the manifest's reference mean_confidence")
    reporting = [d for d in devices if d.confidence_count > 0]
    count = sum(d.confidence_count for d in reporting)
    drop = None
    if count:
        drop = reference.mean_confidence - sum(d.confidence_sum for d in reporting) / count
    return _judge(
        "confidence_drop",
        drop,
        limit,
        enough=_enough(reporting, count, gates, gates.min_predictions),
        evidence=count,
        needed=gates.min_predictions,
        note=f"predictions with a confidence on {len(reporting)} device(s)",
    )


def _class_shift(
    gates: Gates, limit: float, devices: Sequence[DeviceEvidence], reference: Reference
) -> GateResult:
    expected = reference.class_distribution
    if not expected:
        raise ValueError("the class shift gate needs the manifest's reference class_distribution")
    totals = [0] * len(expected)
    reporting = [d for d in devices if sum(d.class_counts) > 0]
    for device in reporting:
        for index, count in enumerate(device.class_counts[: len(expected)]):
            totals[index] += count
    counted = sum(totals)
    shift = None
    if counted:
        # Total variation distance: the share of predictions that would have to change
        # class for the live distribution to match the reference (0 same, 1 disjoint).
        shift = 0.5 * sum(abs(t / counted - e) for t, e in zip(totals, expected, strict=True))
    return _judge(
        "class_shift",
        shift,
        limit,
        enough=_enough(reporting, counted, gates, gates.min_predictions),
        evidence=counted,
        needed=gates.min_predictions,
        note=f"classified predictions on {len(reporting)} device(s)",
    )


def _judge(
    gate: str,
    measured: float | None,
    limit: float,
    *,
    enough: bool,
    evidence: int,
    needed: int,
    note: str,
) -> GateResult:
    if not enough or measured is None or math.isnan(measured):
        verdict = Verdict.WAIT
    elif (measured < limit) if gate in AT_LEAST else (measured > limit):
        verdict = Verdict.FAIL
    else:
        verdict = Verdict.PASS
    return GateResult(gate, verdict, measured, limit, evidence, needed, note)


def _median(values: Sequence[float]) -> float:
    middle = len(values) // 2
    if len(values) % 2:
        return values[middle]
    return (values[middle - 1] + values[middle]) / 2
