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
from sqlalchemy.orm import Session

from fleet_server.rollouts import evidence, service
from fleet_server.rollouts.gates import GateResult, Phase, Verdict, evaluate, overall
from fleet_server.rollouts.service import Action, Conflict, finish, record
from fleet_server.rollouts.spec import RolloutCreate
from fleet_server.services import desired
from fleet_server.state import FleetState
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
# Update states that end a device's handling of a desired state.
SUCCEEDED = {"active", "shadow"}
FAILED = {"failed", "rejected", "rolled_back"}


def deployment_id(rollout: Rollout, phase: str) -> str:
    return f"rollout-{rollout.id}-wave-{rollout.wave}-{phase}"


# --- one step -------------------------------------------------------------------------------


def step(session: Session, state: FleetState, rollout: Rollout, now: dt.datetime) -> None:
    if rollout.state != "running":
        return
    spec = RolloutCreate.model_validate(rollout.spec)
    wave_spec = spec.waves[rollout.wave]
    _admit_newcomers(session, state, rollout, now)
    if rollout.phase is None:
        _start_phase(session, state, rollout, "shadow" if wave_spec.shadow_first else "active", now)
        return
    members = _members(session, rollout)
    _refresh(session, rollout, members, spec.device_timeout_s, now)
    results = judge(session, rollout, members)
    verdict = overall(results)
    started = aware(rollout.phase_started_at) or now
    baked = now - started >= dt.timedelta(seconds=wave_spec.bake_s)
    failed = [r for r in results if r.verdict is Verdict.FAIL]
    if failed and (baked or any(r.gate in FINAL_GATES for r in failed)):
        _fail(session, state, rollout, spec.on_failure, failed, results, now)
    elif not baked:
        return
    elif verdict is Verdict.PASS:
        _pass(session, state, rollout, results, now)
    elif now - started >= dt.timedelta(seconds=wave_spec.bake_s + spec.evidence_timeout_s):
        waiting = "; ".join(r.describe() for r in results if r.verdict is Verdict.WAIT)
        rollout.state = "paused"
        rollout.reason = f"wave {rollout.wave + 1}: not enough evidence: {waiting}"
        record(session, rollout, "paused", rollout.reason, gates=_gates(results))


def judge(session: Session, rollout: Rollout, members: Sequence[RolloutDevice]) -> list[GateResult]:
    """The gates of the rollout's current wave and phase, on the evidence so far."""
    phase: Phase = "shadow" if rollout.phase == "shadow" else "active"
    model = session.get(ModelVersion, rollout.model_id)
    spec = RolloutCreate.model_validate(rollout.spec)
    found = evidence.gather(session, rollout, members, phase)
    return evaluate(spec.gates.gates(), found, service.reference_of(model), phase)


def _members(session: Session, rollout: Rollout) -> list[RolloutDevice]:
    return list(
        session.scalars(
            select(RolloutDevice)
            .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave == rollout.wave)
            .order_by(RolloutDevice.device_id)
        )
    )


def _start_phase(
    session: Session, state: FleetState, rollout: Rollout, phase: str, now: dt.datetime
) -> None:
    # A wave's first phase starts it; going from shadow to active switches it.
    kind = "wave_switched" if rollout.phase == "shadow" else "wave_started"
    rollout.phase = phase
    rollout.phase_started_at = now
    model = session.get(ModelVersion, rollout.model_id)
    assigned = 0
    for member in _members(session, rollout):
        if member.state in ("failed", "timed_out"):
            continue  # it keeps the model it has; the install gate already counted it
        _assign(session, state, rollout, member, model, phase, now)
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
    state: FleetState,
    rollout: Rollout,
    member: RolloutDevice,
    model: ModelVersion | None,
    phase: str,
    now: dt.datetime,
) -> None:
    device = session.get(Device, member.device_id)
    if device is None or device.decommissioned_at is not None:
        member.state = "failed"
        member.reason = "device decommissioned"
        member.finished_at = now
        return
    member.deployment_id = deployment_id(rollout, phase)
    member.state = "installing"
    member.assigned_at = now
    member.finished_at = None
    member.reason = None
    desired.assign(
        session,
        state,
        device,
        model,
        mode="shadow" if phase == "shadow" else "active",
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
        m.device_id: m for m in members if m.state == "installing" and m.deployment_id is not None
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
        if report is not None and report.state in SUCCEEDED:
            member.state = report.state
            member.finished_at = report.ts
            if report.state == "active":
                member.switched_at = report.ts
        elif report is not None and report.state in FAILED:
            member.state = "failed"
            member.finished_at = report.ts
            member.reason = f"{report.state}: {report.reason or 'no reason given'}"
        elif _older(member.assigned_at, now, timeout_s):
            member.state = "timed_out"
            member.finished_at = now
            member.reason = f"no terminal report within {timeout_s:g} s"


def _older(moment: dt.datetime | None, now: dt.datetime, seconds: float) -> bool:
    since = aware(moment)
    return since is not None and now - since > dt.timedelta(seconds=seconds)


def _admit_newcomers(
    session: Session, state: FleetState, rollout: Rollout, now: dt.datetime
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
            state="pending",
            previous_model_id=previous,
        )
        session.add(member)
        if rollout.phase is not None:
            model = session.get(ModelVersion, rollout.model_id)
            _assign(session, state, rollout, member, model, rollout.phase, now)
        record(session, rollout, "device_joined", f"{device.id} joined wave {rollout.wave + 1}")


def _pass(
    session: Session,
    state: FleetState,
    rollout: Rollout,
    results: Sequence[GateResult],
    now: dt.datetime,
) -> None:
    spec = RolloutCreate.model_validate(rollout.spec)
    number = rollout.wave + 1
    if rollout.phase == "shadow":
        record(
            session,
            rollout,
            "gates_passed",
            f"wave {number} shadow: {_summary(results)}",
            gates=_gates(results),
        )
        _start_phase(session, state, rollout, "active", now)
        return
    record(
        session,
        rollout,
        "gates_passed",
        f"wave {number}: {_summary(results)}",
        gates=_gates(results),
    )
    if number == len(spec.waves):
        finish(rollout, "completed", None)
        record(session, rollout, "completed", f"{rollout.model_version} reached every wave")
        return
    rollout.wave += 1
    rollout.phase = None
    rollout.phase_started_at = None
    if spec.waves[number - 1].pause_after:
        rollout.state = "paused"
        rollout.reason = f"wave {number} passed; waiting for a person to resume"
        record(session, rollout, "paused", rollout.reason)


def _fail(
    session: Session,
    state: FleetState,
    rollout: Rollout,
    action: str,
    failed: Sequence[GateResult],
    results: Sequence[GateResult],
    now: dt.datetime,
) -> None:
    reason = f"wave {rollout.wave + 1}: " + "; ".join(r.describe() for r in failed)
    record(session, rollout, "gates_failed", reason, gates=_gates(results))
    if action == "rollback":
        roll_back(session, state, rollout, reason, now)
    else:
        rollout.state = "paused"
        rollout.reason = reason
        record(session, rollout, "paused", reason)


def roll_back(
    session: Session,
    state: FleetState,
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
            state,
            device,
            previous,
            mode="active",
            actor=f"rollout:{rollout.id}",
            rollback=True,
            deployment_id=member.deployment_id,
        )
        member.state = "reverted"
        member.finished_at = now
        reverted += 1
    finish(rollout, "rolled_back", reason)
    record(
        session,
        rollout,
        "rolled_back",
        f"{reverted} device(s) get their previous model back: {reason}",
        actor=actor,
    )


def _summary(results: Sequence[GateResult]) -> str:
    return "; ".join(r.describe() for r in results) or "no gates"


def _gates(results: Sequence[GateResult]) -> list[dict[str, object]]:
    return [r.as_dict() for r in results]


# --- operators' actions ----------------------------------------------------------------------


def act(session: Session, state: FleetState, rollout: Rollout, action: Action, actor: str) -> None:
    now = dt.datetime.now(dt.UTC)
    if rollout.state in service.FINAL_STATES:
        raise Conflict(f"rollout {rollout.id} is {rollout.state}; it cannot {action}")
    if action == "pause":
        if rollout.state == "paused":
            raise Conflict(f"rollout {rollout.id} is already paused")
        rollout.state = "paused"
        rollout.reason = f"paused by {actor}"
        record(session, rollout, "paused", rollout.reason, actor=actor)
    elif action == "resume":
        if rollout.state != "paused":
            raise Conflict(f"rollout {rollout.id} is {rollout.state}, not paused")
        rollout.state = "running"
        rollout.reason = None
        if rollout.phase is not None:
            rollout.phase_started_at = now  # the bake (and the evidence) starts over
        record(session, rollout, "resumed", f"resumed by {actor}", actor=actor)
    elif action == "abort":
        finish(rollout, "aborted", f"aborted by {actor}; devices keep what they run")
        record(session, rollout, "aborted", rollout.reason or "", actor=actor)
    else:
        roll_back(session, state, rollout, f"rolled back by {actor}", now, actor)


# --- the loop ---------------------------------------------------------------------------------


class RolloutController:
    """Steps every running rollout every `interval_s`, on a thread of its own."""

    def __init__(self, state: FleetState, interval_s: float) -> None:
        self.state = state
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
        with self.state.sessions() as session:
            ids = list(session.scalars(select(Rollout.id).where(Rollout.state == "running")))
        for rollout_id in ids:
            self.step_one(rollout_id)

    def step_one(self, rollout_id: int) -> None:
        with self.state.sessions() as session, session.begin():
            # SKIP LOCKED: a rollout another replica is stepping is its business this tick.
            rollout = session.scalar(
                select(Rollout).where(Rollout.id == rollout_id).with_for_update(skip_locked=True)
            )
            if rollout is None:
                return
            step(session, self.state, rollout, dt.datetime.now(dt.UTC))
