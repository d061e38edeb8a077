"""Staged rollouts: create, list, show, and the operators' actions on one."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.rollouts import controller, service
from fleet_server.rollouts.spec import RolloutCreate
from fleet_server.rollouts.watch import LiveGates
from fleet_server.tables import Rollout, RolloutDevice, RolloutEvent

router = APIRouter(prefix="/api/v1", tags=["rollouts"])


class WaveProgress(BaseModel):
    index: int  # from 0
    devices: int
    states: dict[str, int]  # execution state -> devices in it
    status: Literal["waiting", "under_way", "done"]


class RolloutRead(BaseModel):
    id: int
    model: str
    version: str
    state: str
    wave: int  # the wave under way (or next), from 0
    phase: str | None
    reason: str | None
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    waves: list[WaveProgress]


class GateRead(BaseModel):
    gate: str
    verdict: str
    measured: float | None
    threshold: float
    evidence: int
    needed: int
    note: str


class RolloutDeviceRead(BaseModel):
    device_id: str
    wave: int
    state: str
    deployment_id: str | None
    assigned_at: dt.datetime | None
    switched_at: dt.datetime | None
    reason: str | None


class RolloutEventRead(BaseModel):
    ts: dt.datetime
    kind: str
    wave: int | None
    message: str
    details: dict[str, Any]


class RolloutDetail(RolloutRead):
    spec: RolloutCreate
    gates: list[GateRead]  # the current wave's gates, as they stand now
    devices: list[RolloutDeviceRead]
    events: list[RolloutEventRead]


def _errors(exc: Exception) -> HTTPException:
    if isinstance(exc, service.NotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    if isinstance(exc, service.Conflict):
        return HTTPException(status.HTTP_409_CONFLICT, str(exc))
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))


def rollout_read(session: Session, rollout: Rollout) -> RolloutRead:
    return RolloutRead(**_summary(session, rollout))


def _summary(session: Session, rollout: Rollout) -> dict[str, Any]:
    counts = service.device_counts(session, rollout)
    spec = RolloutCreate.model_validate(rollout.spec)
    waves = []
    for index in range(len(spec.waves)):
        states = counts.get(index, {})
        if index < rollout.wave or rollout.state == "completed":
            progress: Literal["waiting", "under_way", "done"] = "done"
        elif index == rollout.wave and rollout.phase is not None:
            progress = "under_way"
        else:
            progress = "waiting"
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


@router.post("/rollouts", status_code=status.HTTP_201_CREATED, response_model=RolloutRead)
def create_rollout(body: RolloutCreate, session: SessionDep, caller: Operator) -> RolloutRead:
    try:
        rollout = service.create(session, body, caller.name)
    except (service.NotFound, service.Conflict, service.Rejected) as exc:
        raise _errors(exc) from None
    session.flush()
    return rollout_read(session, rollout)


@router.get("/rollouts", response_model=list[RolloutRead])
def list_rollouts(session: SessionDep, _: Viewer, state: str | None = None) -> list[RolloutRead]:
    return [rollout_read(session, r) for r in service.list_rollouts(session, state)]


@router.get("/rollouts/{rollout_id}", response_model=RolloutDetail)
def show_rollout(rollout_id: int, session: SessionDep, state: StateDep, _: Viewer) -> RolloutDetail:
    try:
        return rollout_detail(session, rollout_id, state.live_gates)
    except service.NotFound as exc:
        raise _errors(exc) from None


def rollout_detail(session: Session, rollout_id: int, live_gates: LiveGates) -> RolloutDetail:
    """Everything about one rollout, its current wave's gates as `live_gates` has them;
    raises service.NotFound. The API and the console show the same."""
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
    if rollout.phase is not None and rollout.state not in service.FINAL_STATES:
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


@router.post("/rollouts/{rollout_id}/{action}", response_model=RolloutRead)
def act_on_rollout(
    rollout_id: int,
    action: Literal["pause", "resume", "abort", "rollback"],
    session: SessionDep,
    state: StateDep,
    caller: Operator,
) -> RolloutRead:
    try:
        rollout = service.get(session, rollout_id, lock=True)
        controller.act(session, state, rollout, action, caller.name)
    except (service.NotFound, service.Conflict) as exc:
        raise _errors(exc) from None
    session.flush()
    return rollout_read(session, rollout)
