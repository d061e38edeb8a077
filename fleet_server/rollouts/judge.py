"""Judging a wave: the evidence its devices reported, weighed by the rollout's gates.

The controller acts on the judgement; the live view (`watch.LiveGates`) shows it to people
and Prometheus. Both come here, so they never judge by different rules.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from fleet_server.rollouts import evidence
from fleet_server.rollouts.gates import GateResult, evaluate
from fleet_server.rollouts.service import reference_of
from fleet_server.rollouts.spec import RolloutCreate
from fleet_server.rollouts.states import Phase
from fleet_server.tables import ModelVersion, Rollout, RolloutDevice


def judge(session: Session, rollout: Rollout, members: Sequence[RolloutDevice]) -> list[GateResult]:
    """The gates of the rollout's current wave and phase, on the evidence so far."""
    phase = Phase.SHADOW if rollout.phase == Phase.SHADOW else Phase.ACTIVE
    model = session.get(ModelVersion, rollout.model_id)
    spec = RolloutCreate.model_validate(rollout.spec)
    found = evidence.gather(session, rollout, members, phase)
    return evaluate(spec.gates, found, reference_of(model), phase)
