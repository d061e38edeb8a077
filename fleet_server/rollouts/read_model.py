"""What people and pipelines read of rollouts: the API's bodies and the queries behind
them. The API, `fleet-server rollout` and the console all show exactly this."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_server.rollouts import service
from fleet_server.rollouts.gates import Verdict
from fleet_server.rollouts.spec import RolloutCreate
from fleet_server.rollouts.states import EventKind, MemberState, Phase, RolloutState, WaveStatus
from fleet_server.rollouts.watch import LiveGates
from fleet_server.tables import Rollout, RolloutDevice, RolloutEvent


class WaveProgress(BaseModel):
    index: int  # from 0
    devices: int
    states: dict[MemberState, int]  # execution state -> devices in it
    status: WaveStatus


class RolloutRead(BaseModel):
    id: int
    model: str
    version: str
    state: RolloutState
    wave: int  # the wave under way (or next), from 0
    phase: Phase | None
    reason: str | None
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    waves: list[WaveProgress]


class GateRead(BaseModel):
    gate: str
    verdict: Verdict
    measured: float | None
    threshold: float
    evidence: int
    needed: int
    note: str


class RolloutDeviceRead(BaseModel):
    device_id: str
    wave: int
    state: MemberState
    deployment_id: str | None
    assigned_at: dt.datetime | None
    switched_at: dt.datetime | None
    reason: str | None


class RolloutEventRead(BaseModel):
    ts: dt.datetime
    kind: EventKind
    wave: int | None
    message: str
    details: dict[str, Any]


class RolloutDetail(RolloutRead):
    spec: RolloutCreate
    gates: list[GateRead]  # the current wave's gates, as they stand now
    devices: list[RolloutDeviceRead]
    events: list[RolloutEventRead]


def rollout_read(session: Session, rollout: Rollout) -> RolloutRead:
    return RolloutRead(**_summary(session, rollout))


def _summary(session: Session, rollout: Rollout) -> dict[str, Any]:
    counts = device_counts(session, rollout)
    spec = RolloutCreate.model_validate(rollout.spec)
    waves = []
    for index in range(len(spec.waves)):
        states = counts.get(index, {})
        if index < rollout.wave or rollout.state == RolloutState.COMPLETED:
            progress = WaveStatus.DONE
        elif index == rollout.wave and rollout.phase is not None:
            progress = WaveStatus.UNDER_WAY
        else:
            progress = WaveStatus.WAITING
        waves.append(
            WaveProgress(index=index, devices=sum(states.values()), states=states, status=progress)
        )
    return {
        "id": rollout.id,
        "model": rollout.model_name,
        "version": rollout.model_version,
        "state": rollout.state,
        "wave": rollout.wave,
        "phase": rollout.phase,
        "reason": rollout.reason,
        "created_by": rollout.created_by,
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
        "finished_at": rollout.finished_at,
        "waves": waves,
    }


def list_rollouts(session: Session, state: RolloutState | None = None) -> list[Rollout]:
    query = select(Rollout).order_by(Rollout.id.desc())
    if state is not None:
        query = query.where(Rollout.state == state)
    return list(session.scalars(query))


def device_counts(session: Session, rollout: Rollout) -> dict[int, dict[MemberState, int]]:
    """Per wave, how many devices are in each execution state."""
    counts: dict[int, dict[MemberState, int]] = {}
    rows = session.execute(
        select(RolloutDevice.wave, RolloutDevice.state, func.count())
        .where(RolloutDevice.rollout_id == rollout.id)
        .group_by(RolloutDevice.wave, RolloutDevice.state)
    )
    for wave, state, count in rows:
        counts.setdefault(wave, {})[state] = count
    return counts


def rollout_detail(session: Session, rollout_id: int, live_gates: LiveGates) -> RolloutDetail:
    """Everything about one rollout, its current wave's gates as `live_gates` has them;
    raises NotFound. The API and the console show the same."""
    rollout = service.get(session, rollout_id)
    spec = RolloutCreate.model_validate(rollout.spec)
    members = list(
        session.scalars(
            select(RolloutDevice)
            .where(RolloutDevice.rollout_id == rollout.id)
            .order_by(RolloutDevice.wave, RolloutDevice.device_id)
        )
    )
    gates: list[GateRead] = []
    if rollout.phase is not None and not rollout.state.is_final:
        current = [m for m in members if m.wave == rollout.wave]
        gates = [
            GateRead.model_validate(r.as_dict()) for r in live_gates(session, rollout, current)
        ]
    events = session.scalars(
        select(RolloutEvent).where(RolloutEvent.rollout_id == rollout.id).order_by(RolloutEvent.id)
    )
    return RolloutDetail(
        **_summary(session, rollout),
        spec=spec,
        gates=gates,
        devices=[
            RolloutDeviceRead(
                device_id=m.device_id,
                wave=m.wave,
                state=m.state,
                deployment_id=m.deployment_id,
                assigned_at=m.assigned_at,
                switched_at=m.switched_at,
                reason=m.reason,
            )
            for m in members
        ],
        events=[
            RolloutEventRead(
                ts=e.ts, kind=e.kind, wave=e.wave, message=e.message, details=e.details
            )
            for e in events
        ],
    )
