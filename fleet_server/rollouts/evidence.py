"""A wave's evidence, read from what devices reported: install outcomes from update reports,
runtime and model figures from telemetry windows.

A device's candidate figures count from its switch to the candidate (its `active` report);
its previous model's figures come from the same device over the span before the rollout
reached it, so each device is compared with itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.models import (
    AccuracyRow,
    InferenceRow,
    ModelVersion,
    Rollout,
    RolloutDevice,
    ShadowRow,
)
from fleet_server.rollouts.gates import DeviceEvidence, Install

# How far back a device's previous model is read, before the rollout reached it.
PREVIOUS_SPAN = dt.timedelta(hours=1)

# Execution states of a rollout device and what they mean for the install gate.
INSTALL = {
    "pending": "pending",
    "installing": "pending",
    "shadow": "succeeded",
    "active": "succeeded",
    "failed": "failed",
    "timed_out": "timed_out",
    "reverted": "succeeded",
}


def gather(
    session: Session, rollout: Rollout, members: Sequence[RolloutDevice], phase: str
) -> list[DeviceEvidence]:
    previous_versions = _versions(session, {m.previous_model_id for m in members})
    return [
        _device(session, rollout, member, previous_versions.get(member.previous_model_id), phase)
        for member in members
    ]


def _versions(session: Session, ids: set[int | None]) -> dict[int | None, str]:
    wanted = [i for i in ids if i is not None]
    if not wanted:
        return {}
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.version).where(ModelVersion.id.in_(wanted))
    )
    return {row.id: row.version for row in rows}


def _device(
    session: Session,
    rollout: Rollout,
    member: RolloutDevice,
    previous_version: str | None,
    phase: str,
) -> DeviceEvidence:
    install: Install = INSTALL.get(member.state, "pending")  # type: ignore[assignment]
    evidence = DeviceEvidence(member.device_id, install)
    if install != "succeeded" or member.assigned_at is None:
        return evidence
    name, version = rollout.model_name, rollout.model_version
    assigned = member.assigned_at
    figures: dict[str, object] = {}
    if phase == "shadow":
        if previous_version is not None:
            compared, agreed = _shadow(
                session, member.device_id, previous_version, version, assigned
            )
            figures.update(compared=compared, agreed=agreed)
        return DeviceEvidence(member.device_id, install, **figures)  # type: ignore[arg-type]
    since = member.switched_at or assigned
    windows = _inference(session, member.device_id, name, version, since, None)
    figures.update(_runtime(windows))
    labelled, correct = _accuracy(session, member.device_id, name, version, since, None)
    figures.update(labelled=labelled, correct=correct)
    if previous_version is not None:
        before = assigned - PREVIOUS_SPAN
        previous = _inference(session, member.device_id, name, previous_version, before, assigned)
        figures["previous_latency_p95_ms"] = _weighted_p95(previous)
        labelled, correct = _accuracy(
            session, member.device_id, name, previous_version, before, assigned
        )
        figures.update(previous_labelled=labelled, previous_correct=correct)
    return DeviceEvidence(member.device_id, install, **figures)  # type: ignore[arg-type]


def _inference(
    session: Session,
    device_id: str,
    name: str,
    version: str,
    since: dt.datetime,
    until: dt.datetime | None,
) -> list[InferenceRow]:
    query = select(InferenceRow).where(
        InferenceRow.device_id == device_id,
        InferenceRow.model_name == name,
        InferenceRow.model_version == version,
        InferenceRow.ts >= since,
    )
    if until is not None:
        query = query.where(InferenceRow.ts < until)
    return list(session.scalars(query))


def _runtime(windows: Sequence[InferenceRow]) -> dict[str, object]:
    predictions = sum(w.count for w in windows)
    answered = [w for w in windows if w.mean_confidence is not None]
    classes = max((len(w.class_counts) for w in windows), default=0)
    counts = [0] * classes
    for window in windows:
        for index, count in enumerate(window.class_counts):
            counts[index] += count
    return {
        "predictions": predictions,
        "errors": sum(w.errors for w in windows),
        "nan_outputs": sum(w.nan_outputs for w in windows),
        "latency_p95_ms": _weighted_p95(windows),
        "confidence_sum": sum((w.mean_confidence or 0.0) * (w.count - w.errors) for w in answered),
        "confidence_count": sum(w.count - w.errors for w in answered),
        "class_counts": tuple(counts),
    }


def _weighted_p95(windows: Sequence[InferenceRow]) -> float | None:
    """The windows' p95 weighted by their inference counts: windows cannot be merged
    exactly, and a busy window says more than a quiet one."""
    weighted = [(w.latency_p95_ms, w.count) for w in windows if w.latency_p95_ms is not None]
    total = sum(count for _, count in weighted)
    if not total:
        return None
    return sum(p95 * count for p95, count in weighted) / total


def _accuracy(
    session: Session,
    device_id: str,
    name: str,
    version: str,
    since: dt.datetime,
    until: dt.datetime | None,
) -> tuple[int, int]:
    query = select(AccuracyRow.labelled, AccuracyRow.correct).where(
        AccuracyRow.device_id == device_id,
        AccuracyRow.model_name == name,
        AccuracyRow.model_version == version,
        AccuracyRow.ts >= since,
    )
    if until is not None:
        query = query.where(AccuracyRow.ts < until)
    rows = session.execute(query).all()
    return sum(r.labelled for r in rows), sum(r.correct for r in rows)


def _shadow(
    session: Session, device_id: str, active: str, candidate: str, since: dt.datetime
) -> tuple[int, int]:
    rows = session.execute(
        select(ShadowRow.compared, ShadowRow.agreed).where(
            ShadowRow.device_id == device_id,
            ShadowRow.active_version == active,
            ShadowRow.candidate_version == candidate,
            ShadowRow.ts >= since,
        )
    ).all()
    return sum(r.compared for r in rows), sum(r.agreed for r in rows)
