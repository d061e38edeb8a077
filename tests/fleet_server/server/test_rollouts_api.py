"""Rollouts through the API and the controller's steps, on SQLite and PostgreSQL, with a
hand-driven clock and update reports written as the MQTT bridge would store them."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from sqlalchemy import select

from fleet_server.auth import Role
from fleet_server.db import transaction
from fleet_server.rollouts import controller
from fleet_server.tables import (
    AuditEvent,
    DesiredState,
    Rollout,
    RolloutDevice,
    UpdateReportRow,
)
from tests.fleet_server.server.conftest import Server

T0 = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def body(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": "tabular",
        "version": "2.0.0",
        "target": {"tags": ["lab"]},
        "waves": [
            {"percent": 10, "bake_s": 0},
            {"percent": 50, "bake_s": 0},
            {"percent": 100, "bake_s": 0},
        ],
        "gates": {"max_install_failure_ratio": 0.0},
    }
    request.update(changes)
    return request


def create(server: Server, headers: dict[str, str], **changes: Any) -> dict[str, Any]:
    response = server.client.post("/api/v1/rollouts", json=body(**changes), headers=headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def step(server: Server, rollout_id: int, now: dt.datetime) -> Rollout:
    with transaction(server.state.sessions) as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        controller.step(session, server.state.desired, rollout, now)
        session.flush()
        session.expunge(rollout)
        return rollout


def members(server: Server, rollout_id: int) -> list[RolloutDevice]:
    with server.state.sessions() as session:
        rows = list(
            session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))
        )
        session.expunge_all()
        return rows


def report(
    server: Server,
    member: RolloutDevice,
    state: str,
    at: dt.datetime,
    reason: str | None = None,
    msg_id: int | None = None,
) -> None:
    with transaction(server.state.sessions) as session:
        seq = session.get(DesiredState, member.device_id)
        assert seq is not None
        session.add(
            UpdateReportRow(
                device_id=member.device_id,
                msg_id=int(at.timestamp() * 1000) if msg_id is None else msg_id,
                ts=at,
                deployment_id=member.deployment_id,
                desired_seq=seq.seq,
                state=state,
                model_name="tabular",
                model_version="2.0.0",
                reason=reason,
            )
        )


def installing(server: Server, rollout_id: int) -> list[RolloutDevice]:
    return [m for m in members(server, rollout_id) if m.state == "installing"]


# --- requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "status", "message"),
    [
        ({"version": "9.9.9"}, 404, "not in the registry"),
        ({"target": {"tags": ["nowhere"]}}, 422, "matches no device"),
        ({"target": {"tags": ["lab"], "all": True}}, 422, "exactly one of tags, devices or all"),
        ({"target": {"devices": ["ghost"]}}, 422, "unknown or decommissioned device"),
        ({"waves": []}, 422, "at least 1"),
        ({"waves": [{"percent": 10, "count": 3}]}, 422, "exactly one of percent or count"),
        ({"waves": [{"percent": 100, "shadow_first": True}]}, 422, "min_shadow_agreement"),
        ({"gates": {"max_error_rate": 2}}, 422, "less than or equal to 1"),
        ({"gates": {"max_confidence_drop": 0.1}}, 422, "reference.mean_confidence"),
        ({"on_failure": "shrug"}, 422, "'pause' or 'rollback'"),
        ({"surprise": 1}, 422, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_refused_and_create_nothing(
    server: Server, lab: dict[str, Any], changes: dict[str, Any], status: int, message: str
) -> None:
    response = server.client.post("/api/v1/rollouts", json=body(**changes), headers=lab["admin"])
    assert response.status_code == status, response.text
    assert message in response.text
    assert server.client.get("/api/v1/rollouts", headers=lab["admin"]).json() == []


def test_viewers_may_look_but_not_act(server: Server, lab: dict[str, Any]) -> None:
    viewer = server.token(Role.viewer)
    refused = server.client.post("/api/v1/rollouts", json=body(), headers=viewer)
    assert refused.status_code == 403
    created = create(server, lab["admin"])
    assert server.client.get(f"/api/v1/rollouts/{created['id']}", headers=viewer).status_code == 200
    assert (
        server.client.post(f"/api/v1/rollouts/{created['id']}/pause", headers=viewer).status_code
        == 403
    )


def test_a_device_takes_part_in_one_active_rollout_at_a_time(
    server: Server, lab: dict[str, Any]
) -> None:
    create(server, lab["admin"])
    again = server.client.post("/api/v1/rollouts", json=body(), headers=lab["admin"])
    assert again.status_code == 409
    assert "in another active rollout" in again.json()["detail"]


def test_waves_are_cut_from_the_target_and_the_last_takes_the_rest(
    server: Server, lab: dict[str, Any]
) -> None:
    created = create(server, lab["admin"])
    assert [w["devices"] for w in created["waves"]] == [1, 5, 4]
    assert created["state"] == "running"
    assert [w["status"] for w in created["waves"]] == ["waiting"] * 3


# --- the controller's steps ----------------------------------------------------------------


def test_each_wave_starts_installs_passes_and_the_rollout_completes(
    server: Server, lab: dict[str, Any]
) -> None:
    rollout_id = create(server, lab["admin"])["id"]
    now = T0
    for wave, size in enumerate((1, 5, 4)):
        rollout = step(server, rollout_id, now)
        assert (rollout.wave, rollout.phase) == (wave, "active")
        started = installing(server, rollout_id)
        assert len(started) == size
        with server.state.sessions() as session:
            for member in started:
                desired = session.get(DesiredState, member.device_id)
                assert desired is not None
                assert f'"deployment_id":"{member.deployment_id}"' in desired.payload_json
        # Nothing passes while a device is still installing.
        assert step(server, rollout_id, now).wave == wave
        for member in started:
            report(server, member, "active", now)
        now += dt.timedelta(seconds=1)
        rollout = step(server, rollout_id, now)
    assert rollout.state == "completed"
    shown = server.client.get(f"/api/v1/rollouts/{rollout_id}", headers=lab["admin"]).json()
    assert {d["state"] for d in shown["devices"]} == {"active"}
    kinds = [e["kind"] for e in shown["events"]]
    assert kinds == ["created"] + ["wave_started", "gates_passed"] * 3 + ["completed"]


def test_a_failed_install_rolls_back_every_device_touched(
    server: Server, lab: dict[str, Any]
) -> None:
    rollout_id = create(server, lab["admin"])["id"]
    step(server, rollout_id, T0)
    [first] = installing(server, rollout_id)
    report(server, first, "active", T0)
    step(server, rollout_id, T0 + dt.timedelta(seconds=1))  # wave 1 passes
    step(server, rollout_id, T0 + dt.timedelta(seconds=1))  # wave 2 starts
    second = installing(server, rollout_id)
    report(server, second[0], "failed", T0, reason="self-test vector 0 differs")
    rollout = step(server, rollout_id, T0 + dt.timedelta(seconds=2))

    assert rollout.state == "rolled_back"
    assert "install_failure_ratio fail" in (rollout.reason or "")
    states = {m.device_id: m.state for m in members(server, rollout_id)}
    touched = {first.device_id, *(m.device_id for m in second)}
    assert {states[d] for d in touched} == {"reverted"}
    assert {s for d, s in states.items() if d not in touched} == {"pending"}
    with server.state.sessions() as session:
        desired = session.get(DesiredState, first.device_id)
        assert desired is not None
        assert '"rollback":true' in desired.payload_json
        assert '"version":"1.0.0"' in desired.payload_json


def test_a_device_s_last_report_counts_even_when_its_clock_stepped_back(
    server: Server, lab: dict[str, Any]
) -> None:
    rollout_id = create(server, lab["admin"])["id"]
    step(server, rollout_id, T0)
    [member] = installing(server, rollout_id)
    # The device reported `switching` and then `active` (its msg_ids count up), but its
    # clock was set back in between, as NTP may do: `active` carries the earlier time.
    report(server, member, "switching", T0 + dt.timedelta(seconds=5), msg_id=1001)
    report(server, member, "active", T0 + dt.timedelta(seconds=1), msg_id=1002)
    step(server, rollout_id, T0 + dt.timedelta(seconds=6))
    [after] = [m for m in members(server, rollout_id) if m.device_id == member.device_id]
    assert after.state == "active"


def test_a_device_silent_past_its_timeout_counts_as_failed(
    server: Server, lab: dict[str, Any]
) -> None:
    rollout_id = create(server, lab["admin"], device_timeout_s=60, on_failure="pause")["id"]
    step(server, rollout_id, T0)
    rollout = step(server, rollout_id, T0 + dt.timedelta(seconds=61))
    assert rollout.state == "paused"
    [member] = [m for m in members(server, rollout_id) if m.wave == 0]
    assert member.state == "timed_out"
    assert member.reason == "no terminal report within 60 s"


def test_a_wave_short_of_evidence_pauses_after_its_evidence_timeout(
    server: Server, lab: dict[str, Any]
) -> None:
    gates = {"max_error_rate": 0.01, "min_predictions": 100}
    rollout_id = create(server, lab["admin"], gates=gates, evidence_timeout_s=300)["id"]
    step(server, rollout_id, T0)
    [member] = installing(server, rollout_id)
    report(server, member, "active", T0)
    assert step(server, rollout_id, T0 + dt.timedelta(seconds=299)).state == "running"
    rollout = step(server, rollout_id, T0 + dt.timedelta(seconds=301))
    assert rollout.state == "paused"
    assert "not enough evidence" in (rollout.reason or "")
    assert "error_rate wait" in (rollout.reason or "")


def test_a_device_joining_the_target_mid_rollout_joins_the_current_wave(
    server: Server, lab: dict[str, Any]
) -> None:
    rollout_id = create(server, lab["admin"])["id"]
    step(server, rollout_id, T0)
    newcomer = server.enroll(token=server.enrollment(tags=["lab"]))["device_id"]
    other = server.enroll(token=server.enrollment(tags=["elsewhere"]))["device_id"]
    step(server, rollout_id, T0 + dt.timedelta(seconds=1))
    states = {m.device_id: (m.wave, m.state) for m in members(server, rollout_id)}
    assert states[newcomer] == (0, "installing")
    assert other not in states
    with server.state.sessions() as session:
        assert session.get(DesiredState, newcomer) is not None


def test_operators_pause_resume_abort_and_roll_back(server: Server, lab: dict[str, Any]) -> None:
    admin = lab["admin"]
    rollout_id = create(server, admin)["id"]
    step(server, rollout_id, T0)

    def act(action: str) -> Any:
        return server.client.post(f"/api/v1/rollouts/{rollout_id}/{action}", headers=admin)

    assert act("resume").status_code == 409  # not paused
    assert act("pause").json()["state"] == "paused"
    with server.state.sessions() as session:
        audited = session.scalars(
            select(AuditEvent.actor).where(AuditEvent.action == "rollout.paused")
        ).all()
    assert audited == ["admin"]  # the operator, not the controller
    assert act("pause").status_code == 409
    paused = step(server, rollout_id, T0 + dt.timedelta(seconds=5))
    assert paused.state == "paused"  # the controller leaves a paused rollout alone
    assert act("resume").json()["state"] == "running"
    assert act("rollback").json()["state"] == "rolled_back"
    for action in ("pause", "resume", "abort", "rollback"):
        assert act(action).status_code == 409
    assert server.client.post("/api/v1/rollouts/999/pause", headers=admin).status_code == 404
    assert (
        server.client.post(f"/api/v1/rollouts/{rollout_id}/explode", headers=admin).status_code
        == 422
    )


def test_an_aborted_rollout_leaves_devices_as_they_are(server: Server, lab: dict[str, Any]) -> None:
    rollout_id = create(server, lab["admin"])["id"]
    step(server, rollout_id, T0)
    response = server.client.post(f"/api/v1/rollouts/{rollout_id}/abort", headers=lab["admin"])
    assert response.json()["state"] == "aborted"
    assert {m.state for m in members(server, rollout_id)} == {"installing", "pending"}
    # Its devices are free for the next rollout.
    assert (
        server.client.post("/api/v1/rollouts", json=body(), headers=lab["admin"]).status_code == 201
    )


def test_a_rollout_another_replica_is_stepping_is_skipped(
    server: Server, lab: dict[str, Any], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("replicas share PostgreSQL; on SQLite one server writes at a time anyway")
    rollout_id = create(server, lab["admin"])["id"]
    other = controller.RolloutController(server.state.sessions, server.state.desired, interval_s=1)
    holding, release = threading.Event(), threading.Event()

    def replica_stepping() -> None:
        with server.state.sessions() as session, session.begin():
            session.get(Rollout, rollout_id, with_for_update=True)
            holding.set()
            release.wait(30)

    replica = threading.Thread(target=replica_stepping)
    replica.start()
    try:
        assert holding.wait(30)
        other.step_one(rollout_id)  # must not block, and must not step
        with server.state.sessions() as session:
            rollout = session.get(Rollout, rollout_id)
            assert rollout is not None
            assert rollout.phase is None
    finally:
        release.set()
        replica.join(30)
    other.step_one(rollout_id)
    with server.state.sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        assert rollout.phase == "active"
