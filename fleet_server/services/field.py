"""How each model version performs in the field: the devices' telemetry windows of a recent
span, aggregated per model name and version by the database.

Read by `/metrics` on every scrape and by the web console, so it runs two GROUP BY queries
(inference windows, accuracy windows) over a range of the `ts` index and never loads a
telemetry row into Python: a few minutes of 1,000 devices reporting every 10 s is some
30,000 rows per table, summed where they lie.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, SQLColumnExpression, case, func, select
from sqlalchemy.orm import Session

from fleet_server.tables import AccuracyRow, InferenceRow


@dataclass(frozen=True)
class VersionField:
    """One model version's figures over the span.

    Latency percentiles cannot be merged from windows' percentiles exactly, and a median
    over windows is awkward in portable SQL: `latency_p50_ms` and `latency_p95_ms` are the
    windows' percentiles averaged with each window's inference count as its weight (the
    same estimate the rollout gates use), so a busy window counts for more than a quiet one.
    """

    model_name: str
    model_version: str
    devices: int  # distinct devices that reported inference windows in the span
    predictions: int  # inferences attempted, failed ones included
    errors: int
    error_rate: float | None  # errors / predictions; None without predictions
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    labelled: int  # predictions the application labelled afterwards
    correct: int
    accuracy: float | None  # correct / labelled; None without labelled feedback
    mean_confidence: float | None  # weighted by the predictions that answered
    nan_outputs: int


def _weighted(
    value: SQLColumnExpression[float | None], weight: SQLColumnExpression[int]
) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """SUM(value x weight) and SUM(weight) over the windows that have a value."""
    present = value.is_not(None)
    return (
        func.sum(case((present, value * weight))),
        func.sum(case((present, weight))),
    )


def _ratio(numerator: float | int | None, denominator: float | int | None) -> float | None:
    if not denominator or numerator is None:
        return None
    return float(numerator) / float(denominator)


def field_performance(session: Session, since: dt.datetime) -> list[VersionField]:
    """Every model version with inference or accuracy windows stamped at or after `since`,
    sorted by name and version. Keep `since` minutes back, not days: the cost grows with
    the rows in the span."""
    w = InferenceRow
    answered = w.count - w.errors
    p50_sum, p50_weight = _weighted(w.latency_p50_ms, w.count)
    p95_sum, p95_weight = _weighted(w.latency_p95_ms, w.count)
    confidence_sum, confidence_weight = _weighted(w.mean_confidence, answered)
    inference = session.execute(
        select(
            w.model_name,
            w.model_version,
            func.count(func.distinct(w.device_id)),
            func.coalesce(func.sum(w.count), 0),
            func.coalesce(func.sum(w.errors), 0),
            func.coalesce(func.sum(w.nan_outputs), 0),
            p50_sum,
            p50_weight,
            p95_sum,
            p95_weight,
            confidence_sum,
            confidence_weight,
        )
        .where(w.ts >= since)
        .group_by(w.model_name, w.model_version)
    ).all()
    a = AccuracyRow
    accuracy = {
        (name, version): (int(labelled), int(correct))
        for name, version, labelled, correct in session.execute(
            select(
                a.model_name,
                a.model_version,
                func.coalesce(func.sum(a.labelled), 0),
                func.coalesce(func.sum(a.correct), 0),
            )
            .where(a.ts >= since)
            .group_by(a.model_name, a.model_version)
        )
    }
    found: dict[tuple[str, str], VersionField] = {}
    for row in inference:
        name, version, devices, predictions, errors, nan = row[:6]
        labelled, correct = accuracy.pop((name, version), (0, 0))
        found[(name, version)] = VersionField(
            model_name=name,
            model_version=version,
            devices=int(devices),
            predictions=int(predictions),
            errors=int(errors),
            error_rate=_ratio(errors, predictions),
            latency_p50_ms=_ratio(row[6], row[7]),
            latency_p95_ms=_ratio(row[8], row[9]),
            labelled=labelled,
            correct=correct,
            accuracy=_ratio(correct, labelled),
            mean_confidence=_ratio(row[10], row[11]),
            nan_outputs=int(nan),
        )
    # Labelled feedback can arrive for a version whose inference windows fell outside the
    # span (feedback lags predictions): it still has an accuracy.
    for (name, version), (labelled, correct) in accuracy.items():
        found[(name, version)] = VersionField(
            model_name=name,
            model_version=version,
            devices=0,
            predictions=0,
            errors=0,
            error_rate=None,
            latency_p50_ms=None,
            latency_p95_ms=None,
            labelled=labelled,
            correct=correct,
            accuracy=_ratio(correct, labelled),
            mean_confidence=None,
            nan_outputs=0,
        )
    return [found[key] for key in sorted(found)]
