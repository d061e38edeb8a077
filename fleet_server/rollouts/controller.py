"""The rollout controller: one step per running rollout per tick, all state in the database.

A step reads where the rollout is (its wave, its phase, when the phase began), brings its
devices' execution states up to date from their update reports, and then does at most one
thing: start the wave, switch a shadow wave to active, pass the wave, fail it (pause or
roll back), or pause for want of evidence. Each step runs in one transaction holding the
rollout's row lock (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL), so with several
server replicas exactly one drives a rollout at a time, and a server killed mid-step
leaves the rollout as it was before that step.

The wave's life, written out:

    (wave k, no phase) --start--> shadow (shadow_first) or active
    shadow --agreement passes after bake--> active (the wave's devices switch)
    active --every gate passes after bake--> wave k+1, or paused (pause_after), or completed
    any phase --a gate fails--> paused or rolled_back (spec.on_failure)
    any phase --evidence still short evidence_timeout_s after bake--> paused
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.errors import Conflict
from fleet_server.rollouts import service
from fleet_server.rollouts.gates import GateResult, Verdict, overall
from fleet_server.rollouts.judge import judge
from fleet_server.rollouts.service import finish, record
from fleet_server.rollouts.spec import RolloutCreate
from fleet_server.rollouts.states import (
    REPORTED,
    Action,
    EventKind,
    MemberState,
    OnFailure,
    Phase,
    RolloutState,
)
from fleet_server.services.desired import DesiredStates
from fleet_server.tables import (
    Device,
    ModelVersion,
    Rollout,
    RolloutDevice,
    UpdateReportRow,
    aware,
)

log = logging.getLogger(__name__)

# Gates whose failure is final whatever more evidence comes: acted on before the bake ends.
FINAL_GATES = ("install_failure_ratio", "nan_outputs")
# A member whose install already failed keeps the model it has when its wave (re)starts:
# the install gate counted it.
_GAVE_UP = (MemberState.FAILED, MemberState.TIMED_OUT)


def deployment_id(rollout: Rollout, phase: Phase) -> str:
    return f"rollout-{rollout.id}-wave-{rollout.wave}-{phase}"


# --- one step -------------------------------------------------------------------------------


def step(session: Session, desired: DesiredStates, rollout: Rollout, now: dt.datetime) -> None:
    if rollout.state != RolloutState.RUNNING:
        return
    spec = RolloutCreate.model_validate(rollout.spec)
    wave_spec = spec.waves[rollout.wave]
    _admit_newcomers(session, desired, rollout, now)
    if rollout.phase is None:
        first = Phase.SHADOW if wave_spec.shadow_first else Phase.ACTIVE
        _start_phase(session, desired, rollout, first, now)
        return
    members = _members(session, rollout)
    _refresh(session, rollout, members, spec.device_timeout_s, now)
    results = judge(session, rollout, members)
    verdict = overall(results)
    started = aware(rollout.phase_started_at) or now
    baked = now - started >= dt.timedelta(seconds=wave_spec.bake_s)
    failed = [r for r in results if r.verdict is Verdict.FAIL]
    if failed and (baked or any(r.gate in FINAL_GATES for r in failed)):
        _fail(session, desired, rollout, spec.on_failure, failed, results, now)
    elif not baked:
        return
    elif verdict is Verdict.PASS:
        _pass(session, desired, rollout, results, now)
    elif now - started >= dt.timedelta(seconds=wave_spec.bake_s + spec.evidence_timeout_s):
        waiting = "; ".join(r.describe() for r in results if r.verdict is Verdict.WAIT)
        rollout.state = RolloutState.PAUSED
        rollout.reason = f"wave {rollout.wave + 1}: not enough evidence: {waiting}"
        record(session, rollout, EventKind.PAUSED, rollout.reason, gates=_gates(results))


def _members(session: Session, rollout: Rollout) -> list[RolloutDevice]:
    return list(
        session.scalars(
            select(RolloutDevice)
            .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave == rollout.wave)
            .order_by(RolloutDevice.device_id)
        )
    )


def _start_phase(
    session: Session, desired: DesiredStates, rollout: Rollout, phase: Phase, now: dt.datetime
) -> None:
    # A wave's first phase starts it; going from shadow to active switches it.
    kind = EventKind.WAVE_SWITCHED if rollout.phase == Phase.SHADOW else EventKind.WAVE_STARTED
    rollout.phase = phase
    rollout.phase_started_at = now
    model = session.get(ModelVersion, rollout.model_id)
    assigned = 0
    for member in _members(session, rollout):
        if member.state in _GAVE_UP:
            continue
        _assign(session, desired, rollout, member, model, phase, now)
        assigned += 1
    record(
        session,
        rollout,
        kind,
        f"wave {rollout.wave + 1}: {assigned} device(s) get {rollout.model_version} ({phase})",
        phase=phase,
        devices=assigned,
    )


def _assign(
    session: Session,
    desired: DesiredStates,
    rollout: Rollout,
    member: RolloutDevice,
    model: ModelVersion | None,
    phase: Phase,
    now: dt.datetime,
) -> None:
    device = session.get(Device, member.device_id)
    if device is None or device.decommissioned_at is not None:
        member.state = MemberState.FAILED
        member.reason = "device decommissioned"
        member.finished_at = now
        return
    member.deployment_id = deployment_id(rollout, phase)
    member.state = MemberState.INSTALLING
    member.assigned_at = now
    member.finished_at = None
    member.reason = None
    desired.assign(
        session,
        device,
        model,
        mode="shadow" if phase == Phase.SHADOW else "active",
        actor=f"rollout:{rollout.id}",
        deployment_id=member.deployment_id,
    )


def _refresh(
    session: Session,
    rollout: Rollout,
    members: Sequence[RolloutDevice],
    timeout_s: float,
    now: dt.datetime,
) -> None:
    """Each installing device's last report on its deployment decides its state."""
    installing = {
        m.device_id: m
        for m in members
        if m.state == MemberState.INSTALLING and m.deployment_id is not None
    }
    if not installing:
        return
    latest: dict[str, UpdateReportRow] = {}
    reports = session.scalars(
        select(UpdateReportRow)
        .where(
            UpdateReportRow.device_id.in_(list(installing)),
            UpdateReportRow.deployment_id.in_({m.deployment_id for m in installing.values()}),
        )
        # The device numbers its reports in the order it made them (msg_id); its clock
        # (ts) may step backwards between two transitions, and a stale `switching` read
        # as the latest would hold the wave until the device timeout.
        .order_by(UpdateReportRow.device_id, UpdateReportRow.msg_id)
    )
    for row in reports:  # in order, so the last one per device stays
        if row.deployment_id == installing[row.device_id].deployment_id:
            latest[row.device_id] = row
    for device_id, member in installing.items():
        report = latest.get(device_id)
        reached = REPORTED.get(report.state) if report is not None else None
        if report is not None and reached is not None:
            member.state = reached
            member.finished_at = report.ts
            if reached == MemberState.ACTIVE:
                member.switched_at = report.ts
            elif reached == MemberState.FAILED:
                member.reason = f"{report.state}: {report.reason or 'no reason given'}"
        elif _older(member.assigned_at, now, timeout_s):
            member.state = MemberState.TIMED_OUT
            member.finished_at = now
            member.reason = f"no terminal report within {timeout_s:g} s"


def _older(moment: dt.datetime | None, now: dt.datetime, seconds: float) -> bool:
    since = aware(moment)
    return since is not None and now - since > dt.timedelta(seconds=seconds)


def _admit_newcomers(
    session: Session, desired: DesiredStates, rollout: Rollout, now: dt.datetime
) -> None:
    """A device that joined the target since (enrolled, or tagged) joins the current wave."""
    known = set(
        session.scalars(
            select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
        )
    )
    candidates = session.scalars(
        select(Device).where(Device.decommissioned_at.is_(None), Device.id.not_in(known))
    )
    for device in candidates:
        if not service.matches(rollout, device):
            continue
        if service.in_other_rollouts(session, [device.id]):
            continue
        previous = service.registry_ids(session, [device])[device.id]
        member = RolloutDevice(
            rollout_id=rollout.id,
            device_id=device.id,
            wave=rollout.wave,
            state=MemberState.PENDING,
            previous_model_id=previous,
        )
        session.add(member)
        if rollout.phase is not None:
            model = session.get(ModelVersion, rollout.model_id)
            _assign(session, desired, rollout, member, model, rollout.phase, now)
        record(
            session, rollout, EventKind.DEVICE_JOINED, f"{device.id} joined wave {rollout.wave + 1}"
        )


def _pass(
    session: Session,
    desired: DesiredStates,
    rollout: Rollout,
    results: Sequence[GateResult],
    now: dt.datetime,
) -> None:
    spec = RolloutCreate.model_validate(rollout.spec)
    number = rollout.wave + 1
    if rollout.phase == Phase.SHADOW:
        record(
            session,
            rollout,
            EventKind.GATES_PASSED,
            f"wave {number} shadow: {_summary(results)}",
            gates=_gates(results),
        )
        _start_phase(session, desired, rollout, Phase.ACTIVE, now)
        return
    record(
        session,
        rollout,
        EventKind.GATES_PASSED,
        f"wave {number}: {_summary(results)}",
        gates=_gates(results),
    )
    if number == len(spec.waves):
        finish(rollout, RolloutState.COMPLETED, None)
        record(session, rollout, EventKind.COMPLETED, f"{rollout.model_version} reached every wave")
        return
    rollout.wave += 1
    rollout.phase = None
    rollout.phase_started_at = None
    if spec.waves[number - 1].pause_after:
        rollout.state = RolloutState.PAUSED
        rollout.reason = f"wave {number} passed; waiting for a person to resume"
        record(session, rollout, EventKind.PAUSED, rollout.reason)


def _fail(
    session: Session,
    desired: DesiredStates,
    rollout: Rollout,
    action: OnFailure,
    failed: Sequence[GateResult],
    results: Sequence[GateResult],
    now: dt.datetime,
) -> None:
    reason = f"wave {rollout.wave + 1}: " + "; ".join(r.describe() for r in failed)
    record(session, rollout, EventKind.GATES_FAILED, reason, gates=_gates(results))
    if action == OnFailure.ROLLBACK:
        roll_back(session, desired, rollout, reason, now)
    else:
        rollout.state = RolloutState.PAUSED
        rollout.reason = reason
        record(session, rollout, EventKind.PAUSED, reason)


def roll_back(
    session: Session,
    desired: DesiredStates,
    rollout: Rollout,
    reason: str,
    now: dt.datetime,
    actor: str = "controller",
) -> None:
    """Every device the rollout touched gets its previous model back, as an explicit
    operator rollback (so the device accepts the lower version)."""
    touched = session.scalars(
        select(RolloutDevice).where(
            RolloutDevice.rollout_id == rollout.id, RolloutDevice.assigned_at.is_not(None)
        )
    )
    reverted = 0
    for member in touched:
        device = session.get(Device, member.device_id)
        if device is None or device.decommissioned_at is not None:
            continue
        previous = (
            session.get(ModelVersion, member.previous_model_id)
            if member.previous_model_id is not None
            else None
        )
        member.deployment_id = f"rollout-{rollout.id}-rollback"
        desired.assign(
            session,
            device,
            previous,
            mode="active",
            actor=f"rollout:{rollout.id}",
            rollback=True,
            deployment_id=member.deployment_id,
        )
        member.state = MemberState.REVERTED
        member.finished_at = now
        reverted += 1
    finish(rollout, RolloutState.ROLLED_BACK, reason)
    record(
        session,
        rollout,
        EventKind.ROLLED_BACK,
        f"{reverted} device(s) get their previous model back: {reason}",
        actor=actor,
    )


def _summary(results: Sequence[GateResult]) -> str:
    return "; ".join(r.describe() for r in results) or "no gates"


def _gates(results: Sequence[GateResult]) -> list[dict[str, object]]:
    return [r.as_dict() for r in results]


# --- operators' actions ----------------------------------------------------------------------


def act(
    session: Session, desired: DesiredStates, rollout: Rollout, action: Action, actor: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    if rollout.state.is_final:
        raise Conflict(f"rollout {rollout.id} is {rollout.state}; it cannot {action}")
    if action == Action.PAUSE:
        if rollout.state == RolloutState.PAUSED:
            raise Conflict(f"rollout {rollout.id} is already paused")
        rollout.state = RolloutState.PAUSED
        rollout.reason = f"paused by {actor}"
        record(session, rollout, EventKind.PAUSED, rollout.reason, actor=actor)
    elif action == Action.RESUME:
        if rollout.state != RolloutState.PAUSED:
            raise Conflict(f"rollout {rollout.id} is {rollout.state}, not paused")
        rollout.state = RolloutState.RUNNING
        rollout.reason = None
        if rollout.phase is not None:
            rollout.phase_started_at = now  # the bake (and the evidence) starts over
        record(session, rollout, EventKind.RESUMED, f"resumed by {actor}", actor=actor)
    elif action == Action.ABORT:
        finish(rollout, RolloutState.ABORTED, f"aborted by {actor}; devices keep what they run")
        record(session, rollout, EventKind.ABORTED, rollout.reason or "", actor=actor)
    else:
        roll_back(session, desired, rollout, f"rolled back by {actor}", now, actor)


# --- the loop ---------------------------------------------------------------------------------


class RolloutController:
    """Steps every running rollout every `interval_s`, on a thread of its own."""

    def __init__(
        self, sessions: sessionmaker[Session], desired: DesiredStates, interval_s: float
    ) -> None:
        self.sessions = sessions
        self.desired = desired
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("rollout controller tick failed")

    def tick(self) -> None:
        with self.sessions() as session:
            running = select(Rollout.id).where(Rollout.state == RolloutState.RUNNING)
            ids = list(session.scalars(running))
        for rollout_id in ids:
            self.step_one(rollout_id)

    def step_one(self, rollout_id: int) -> None:
        with self.sessions() as session, session.begin():
            # SKIP LOCKED: a rollout another replica is stepping is its business this tick.
            rollout = session.scalar(
                select(Rollout).where(Rollout.id == rollout_id).with_for_update(skip_locked=True)
            )
            if rollout is None:
                return
            step(session, self.desired, rollout, dt.datetime.now(dt.UTC))
