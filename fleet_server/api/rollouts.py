"""Staged rollouts: create, list, show, and the operators' actions on one."""

from __future__ import annotations

from fastapi import APIRouter, status

from fleet_server.api.deps import Operator, SessionDep, StateDep, Viewer
from fleet_server.rollouts import controller, service
from fleet_server.rollouts.read_model import (
    RolloutDetail,
    RolloutRead,
    list_rollouts,
    rollout_detail,
    rollout_read,
)
from fleet_server.rollouts.spec import RolloutCreate
from fleet_server.rollouts.states import Action, RolloutState

router = APIRouter(prefix="/api/v1", tags=["rollouts"])


@router.post("/rollouts", status_code=status.HTTP_201_CREATED, response_model=RolloutRead)
def create_rollout(body: RolloutCreate, session: SessionDep, caller: Operator) -> RolloutRead:
    rollout = service.create(session, body, caller.name)
    session.flush()
    return rollout_read(session, rollout)


@router.get("/rollouts", response_model=list[RolloutRead])
def get_rollouts(
    session: SessionDep, _: Viewer, state: RolloutState | None = None
) -> list[RolloutRead]:
    return [rollout_read(session, r) for r in list_rollouts(session, state)]


@router.get("/rollouts/{rollout_id}", response_model=RolloutDetail)
def show_rollout(rollout_id: int, session: SessionDep, state: StateDep, _: Viewer) -> RolloutDetail:
    return rollout_detail(session, rollout_id, state.live_gates)


@router.post("/rollouts/{rollout_id}/{action}", response_model=RolloutRead)
def act_on_rollout(
    rollout_id: int, action: Action, session: SessionDep, state: StateDep, caller: Operator
) -> RolloutRead:
    rollout = service.get(session, rollout_id, lock=True)
    controller.act(session, state.desired, rollout, action, caller.name)
    session.flush()
    return rollout_read(session, rollout)
