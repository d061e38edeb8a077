"""A wave's evidence, read from what devices reported: install outcomes from update reports,
runtime and model figures from telemetry windows.

A device's candidate figures count from its switch to the candidate (its `active` report);
its previous model's figures come from the same device over the span before the rollout
reached it, so each device is compared with itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from fleet_server.rollouts.gates import DeviceEvidence
from fleet_server.rollouts.states import RESULT, InstallResult, Phase
from fleet_server.tables import (
    AccuracyRow,
    InferenceRow,
    ModelVersion,
    Rollout,
    RolloutDevice,
    ShadowRow,
    aware,
)

# How far back a device's previous model is read, before the rollout reached it.
PREVIOUS_SPAN = dt.timedelta(hours=1)


def gather(
    session: Session, rollout: Rollout, members: Sequence[RolloutDevice], phase: Phase
) -> list[DeviceEvidence]:
    """One query per table for the whole wave, however many devices it has: the controller
    asks on every step."""
    previous = _versions(session, {m.previous_model_id for m in members})
    reporting = [m for m in members if _installed(m)]
    if not reporting:
        return [DeviceEvidence(m.device_id, RESULT[m.state]) for m in members]
    ids = [m.device_id for m in reporting]
    # Everything any device of the wave could count: its previous model from an hour
    # before the earliest assignment, the candidate since.
    since = min(_assigned(m) for m in reporting) - PREVIOUS_SPAN
    if phase == Phase.SHADOW:
        shadow = _rows(
            session, ShadowRow, ids, since, ShadowRow.candidate_version == rollout.model_version
        )
        inference: dict[str, list[InferenceRow]] = {}
        accuracy: dict[str, list[AccuracyRow]] = {}
    else:
        shadow = {}
        name = rollout.model_name
        inference = _rows(session, InferenceRow, ids, since, InferenceRow.model_name == name)
        accuracy = _rows(session, AccuracyRow, ids, since, AccuracyRow.model_name == name)
    return [
        _device(
            rollout,
            member,
            previous.get(member.previous_model_id),
            phase,
            inference.get(member.device_id, []),
            accuracy.get(member.device_id, []),
            shadow.get(member.device_id, []),
        )
        for member in members
    ]


def _installed(member: RolloutDevice) -> bool:
    return RESULT[member.state] == InstallResult.SUCCEEDED and member.assigned_at is not None


def _assigned(member: RolloutDevice) -> dt.datetime:
    assigned = aware(member.assigned_at)
    assert assigned is not None
    return assigned


def _versions(session: Session, ids: set[int | None]) -> dict[int | None, str]:
    wanted = [i for i in ids if i is not None]
    if not wanted:
        return {}
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.version).where(ModelVersion.id.in_(wanted))
    )
    return {row.id: row.version for row in rows}


Row = TypeVar("Row", InferenceRow, AccuracyRow, ShadowRow)


def _rows(
    session: Session,
    table: type[Row],
    device_ids: Sequence[str],
    since: dt.datetime,
    *where: ColumnElement[bool],
) -> dict[str, list[Row]]:
    found: dict[str, list[Row]] = {}
    query = select(table).where(table.device_id.in_(device_ids), table.ts >= since, *where)
    for row in session.scalars(query):
        found.setdefault(row.device_id, []).append(row)
    return found


def _device(
    rollout: Rollout,
    member: RolloutDevice,
    previous_version: str | None,
    phase: Phase,
    inference: Sequence[InferenceRow],
    accuracy: Sequence[AccuracyRow],
    shadow: Sequence[ShadowRow],
) -> DeviceEvidence:
    evidence = DeviceEvidence(member.device_id, RESULT[member.state])
    if not _installed(member):
        return evidence
    assigned = _assigned(member)
    version = rollout.model_version
    if phase == Phase.SHADOW:
        compared = [
            r for r in shadow if r.active_version == previous_version and _at(r) >= assigned
        ]
        return replace(
            evidence,
            compared=sum(r.compared for r in compared),
            agreed=sum(r.agreed for r in compared),
        )
    since = aware(member.switched_at) or assigned
    candidate = [w for w in inference if w.model_version == version and _at(w) >= since]
    labelled = [a for a in accuracy if a.model_version == version and _at(a) >= since]
    evidence = replace(
        _runtime(evidence, candidate),
        labelled=sum(a.labelled for a in labelled),
        correct=sum(a.correct for a in labelled),
    )
    if previous_version is None:
        return evidence
    before = assigned - PREVIOUS_SPAN
    earlier = [
        w for w in inference if w.model_version == previous_version and before <= _at(w) < assigned
    ]
    known = [
        a for a in accuracy if a.model_version == previous_version and before <= _at(a) < assigned
    ]
    return replace(
        evidence,
        previous_latency_p95_ms=_weighted_p95(earlier),
        previous_labelled=sum(a.labelled for a in known),
        previous_correct=sum(a.correct for a in known),
    )


def _at(row: InferenceRow | AccuracyRow | ShadowRow) -> dt.datetime:
    moment = aware(row.ts)
    assert moment is not None
    return moment


def _runtime(evidence: DeviceEvidence, windows: Sequence[InferenceRow]) -> DeviceEvidence:
    answered = [w for w in windows if w.mean_confidence is not None]
    counts = [0] * max((len(w.class_counts) for w in windows), default=0)
    for window in windows:
        for index, count in enumerate(window.class_counts):
            counts[index] += count
    return replace(
        evidence,
        predictions=sum(w.count for w in windows),
        errors=sum(w.errors for w in windows),
        nan_outputs=sum(w.nan_outputs for w in windows),
        latency_p95_ms=_weighted_p95(windows),
        confidence_sum=sum((w.mean_confidence or 0.0) * (w.count - w.errors) for w in answered),
        confidence_count=sum(w.count - w.errors for w in answered),
        class_counts=tuple(counts),
    )


def _weighted_p95(windows: Sequence[InferenceRow]) -> float | None:
    """The windows' p95 weighted by their inference counts: windows cannot be merged
    exactly, and a busy window says more than a quiet one."""
    weighted = [(w.latency_p95_ms, w.count) for w in windows if w.latency_p95_ms is not None]
    total = sum(count for _, count in weighted)
    if not total:
        return None
    return sum(p95 * count for p95, count in weighted) / total
