"""Webhook alerts on a real server and a real database (SQLite, and PostgreSQL when
EDGEFLEET_TEST_POSTGRES_URL is set), posted to real local HTTP receivers. The dispatcher
is driven by hand with a fake clock, except where its threads are what is tested."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fleet_server.alerts import detect, store
from fleet_server.alerts.config import AlertKind, WebhookConfig
from fleet_server.alerts.dispatcher import AlertDispatcher
from fleet_server.alerts.signing import verify_signature
from fleet_server.app import build_state, create_app
from fleet_server.auth import Role
from fleet_server.db import transaction
from fleet_server.mqtt.ingest import Received, write_batch
from fleet_server.rollouts import controller
from fleet_server.rollouts.states import MemberState, Phase
from fleet_server.settings import Settings
from fleet_server.state import FleetState
from fleet_server.tables import Alert, AlertDelivery, ModelVersion, Rollout, RolloutDevice
from protocol.messages import AccuracyWindow, Availability, TelemetryBatch
from tests.fleet_server.server.conftest import Server
from tests.fleet_server.webhook_receiver import Receiver, closed_port_url, receiving

SECRET = "s3cr3t-shared-with-the-receiver"


class FakeClock:
    """Starts at the real time (rollout events carry real timestamps) and moves by hand."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


@dataclass
class Alerting:
    server: Server
    clock: FakeClock
    dispatcher: AlertDispatcher
    admin: dict[str, str]

    @property
    def state(self) -> FleetState:
        return self.server.state

    def tick(self) -> int:
        """One look for alerts and one delivery round, by hand, at the fake clock's time."""
        raised = self.dispatcher.raise_alerts()
        self.dispatcher.deliver_all()
        return raised

    def alerts(self, kind: str | None = None) -> list[Alert]:
        with self.state.sessions() as session:
            query = select(Alert).order_by(Alert.id)
            if kind is not None:
                query = query.where(Alert.kind == kind)
            return list(session.scalars(query))

    def deliveries(self) -> list[AlertDelivery]:
        with self.state.sessions() as session:
            return list(
                session.scalars(
                    select(AlertDelivery).order_by(AlertDelivery.alert_id, AlertDelivery.webhook)
                )
            )


Factory = Callable[..., Alerting]


@pytest.fixture
def alerting(database_url: str, tmp_path: Path) -> Iterator[Factory]:
    """Builds a server whose webhooks point at the given receivers; the lifespan's
    dispatcher is off (alert_interval_s=0) unless a test turns it on."""
    with ExitStack() as stack:

        def make(webhooks: Sequence[dict[str, Any]], **overrides: Any) -> Alerting:
            values: dict[str, Any] = {
                "data_dir": tmp_path / "data",
                "database_url": database_url,
                "rollout_interval_s": 0,
                "alert_interval_s": 0,
                "webhook_backoff_s": 10,
                "webhooks": list(webhooks),
                **overrides,
            }
            settings = Settings(**values)
            app = create_app(settings, start_bridge=False)
            client = stack.enter_context(TestClient(app))
            server = Server(client, app.state.fleet, settings)
            clock = FakeClock()
            dispatcher = AlertDispatcher(server.state.settings, server.state.sessions, clock=clock)
            stack.callback(dispatcher.stop)
            return Alerting(server, clock, dispatcher, server.token(Role.admin))

        yield make


def webhook(receiver: Receiver | str, **options: Any) -> dict[str, Any]:
    url = receiver if isinstance(receiver, str) else receiver.url
    return {"url": url, "secret": SECRET, **options}


# --- fleet pieces, written as the API and the MQTT bridge would --------------------------------


def add_model(state: FleetState, name: str = "tabular", version: str = "2.0.0") -> None:
    # Rollouts only look the model up; nothing here sends it to a device.
    with transaction(state.sessions) as session:
        session.add(
            ModelVersion(
                name=name,
                version=version,
                sha256="ab" * 32,
                size=1,
                quantization="int8",
                signed_by="test",
                manifest_json="{}",
                uploaded_by="test",
            )
        )


def create_rollout(a: Alerting, devices: int = 2, **changes: Any) -> int:
    for _ in range(devices):
        a.server.enroll(token=a.server.enrollment(tags=["lab"]))
    body = {
        "model": "tabular",
        "version": "2.0.0",
        "target": {"tags": ["lab"]},
        "waves": [{"percent": 100, "bake_s": 0}],
        "gates": {"max_install_failure_ratio": 0.0},
        **changes,
    }
    response = a.server.client.post("/api/v1/rollouts", json=body, headers=a.admin)
    assert response.status_code == 201, response.text
    rollout_id: int = response.json()["id"]
    return rollout_id


def act(a: Alerting, rollout_id: int, action: str) -> None:
    response = a.server.client.post(f"/api/v1/rollouts/{rollout_id}/{action}", headers=a.admin)
    assert response.status_code == 200, response.text


def availability(state: FleetState, device_id: str, status: str, at: dt.datetime) -> None:
    message = Availability(1, "online" if status == "online" else "offline", at.timestamp())
    with transaction(state.sessions) as session:
        write_batch(session, [Received(device_id, message, at)])


_SEQ = iter(range(1, 10**6))


def accuracy(
    state: FleetState, device_id: str, version: str, labelled: int, correct: int, at: dt.datetime
) -> None:
    window = AccuracyWindow(at.timestamp(), "tabular", version, 60.0, labelled, correct)
    batch = TelemetryBatch(1, next(_SEQ), at.timestamp(), 0, (), (), (window,), ())
    with transaction(state.sessions) as session:
        result = write_batch(session, [Received(device_id, batch, at)])
    assert result.stored == 1


# --- rollouts --------------------------------------------------------------------------------


def test_rollout_pause_rollback_and_abort_each_fire_one_signed_webhook(
    alerting: Factory,
) -> None:
    with receiving() as receiver, receiving() as offline_only:
        a = alerting([webhook(receiver), webhook(offline_only, events=["device.offline"])])
        add_model(a.state)
        first = create_rollout(a)
        assert a.tick() == 0  # created: nothing to say

        act(a, first, "pause")
        assert a.tick() == 1
        assert a.tick() == 0  # the same pause is not raised twice
        [paused] = receiver.requests
        body = paused.json()
        assert body["kind"] == "rollout.paused"
        assert paused.headers["X-Edgefleet-Event"] == "rollout.paused"
        assert paused.headers["X-Edgefleet-Delivery"] == body["id"]
        assert body["data"]["rollout_id"] == first
        assert body["data"]["actor"] == "admin"
        assert body["data"]["reason"] == "paused by admin"
        assert body["data"]["failed_gates"] == []
        assert f"rollout {first} (tabular 2.0.0) paused" in body["summary"]
        assert verify_signature(SECRET, paused.body, paused.headers)
        assert not verify_signature("not-the-secret", paused.body, paused.headers)

        act(a, first, "resume")
        act(a, first, "rollback")
        second = create_rollout(a, devices=0)  # the same devices, free again
        act(a, second, "abort")
        a.tick()
        a.tick()
        kinds = [(b["kind"], b["data"]["rollout_id"]) for b in receiver.bodies()]
        assert kinds == [
            ("rollout.paused", first),
            ("rollout.rolled_back", first),
            ("rollout.aborted", second),
        ]
        assert all(verify_signature(SECRET, r.body, r.headers) for r in receiver.requests)
        assert len({b["id"] for b in receiver.bodies()}) == 3
        assert offline_only.requests == []  # its filter takes no rollout events

        # A restarted server (a new dispatcher on the same database) raises nothing again.
        again = AlertDispatcher(a.state.settings, a.state.sessions, clock=a.clock)
        assert again.raise_alerts() == 0
        again.deliver_all()
        assert len(receiver.requests) == 3


@pytest.mark.parametrize(("on_failure", "kind"), [("pause", "paused"), ("rollback", "rolled_back")])
def test_a_failed_gate_fires_one_alert_naming_the_gate(
    alerting: Factory, on_failure: str, kind: str
) -> None:
    with receiving() as receiver:
        a = alerting([webhook(receiver)])
        add_model(a.state)
        rollout_id = create_rollout(a, devices=1, on_failure=on_failure)
        # The wave is under way and its one device failed to install, as the controller
        # would have it after the device's report; then the controller's own step decides.
        with transaction(a.state.sessions) as session:
            rollout = session.get(Rollout, rollout_id)
            assert rollout is not None
            rollout.phase, rollout.phase_started_at = Phase.ACTIVE, a.clock.now
            for member in session.scalars(select(RolloutDevice)):
                member.state, member.reason = MemberState.FAILED, "failed: self-test differs"
            controller.step(session, a.state.desired, rollout, a.clock.now)
            assert rollout.state == kind

        a.tick()
        [body] = receiver.bodies()
        assert body["kind"] == f"rollout.{kind}"
        assert body["data"]["actor"] == "controller"
        assert [g["gate"] for g in body["data"]["failed_gates"]] == ["install_failure_ratio"]
        assert "install_failure_ratio fail" in body["data"]["reason"]


# --- devices offline -------------------------------------------------------------------------


def test_a_device_offline_too_long_fires_once_per_episode(alerting: Factory) -> None:
    with receiving() as receiver:
        a = alerting([webhook(receiver)], alert_offline_after_s=600)
        device_id = a.server.enroll()["device_id"]
        a.tick()
        assert receiver.requests == []  # enrolled, never seen: not an outage

        availability(a.state, device_id, "online", a.clock.now)
        went = a.clock.advance(60)
        availability(a.state, device_id, "offline", went)
        a.clock.advance(599)
        a.tick()
        assert receiver.requests == []  # not yet past the threshold
        a.clock.advance(2)
        a.tick()
        [body] = receiver.bodies()
        assert body["kind"] == "device.offline"
        assert body["data"]["device_id"] == device_id
        assert body["data"]["offline_for_s"] == pytest.approx(601)
        assert body["data"]["threshold_s"] == 600
        assert verify_signature(SECRET, receiver.requests[0].body, receiver.requests[0].headers)

        a.clock.advance(3600)
        a.tick()
        # The bridge reconnecting sees the retained "offline" again, which moves
        # last_seen_at: the same outage, not a new one.
        availability(a.state, device_id, "offline", a.clock.now)
        a.tick()
        assert a.alerts("device.offline")[0].resolved_at is None
        a.clock.advance(700)
        a.tick()
        assert len(receiver.requests) == 1

        availability(a.state, device_id, "online", a.clock.advance(10))
        a.tick()  # back: the alert resolves and re-arms
        assert a.alerts("device.offline")[0].resolved_at is not None
        availability(a.state, device_id, "offline", a.clock.advance(10))
        a.clock.advance(601)
        a.tick()
        a.tick()
        assert [b["kind"] for b in receiver.bodies()] == ["device.offline"] * 2
        assert len({b["id"] for b in receiver.bodies()}) == 2


def test_a_decommissioned_device_raises_no_offline_alert(alerting: Factory) -> None:
    with receiving() as receiver:
        a = alerting([webhook(receiver)], alert_offline_after_s=60)
        device_id = a.server.enroll()["device_id"]
        availability(a.state, device_id, "offline", a.clock.now)
        gone = a.server.client.delete(f"/api/v1/devices/{device_id}", headers=a.admin)
        assert gone.status_code == 204, gone.text
        a.clock.advance(120)
        a.tick()
        assert receiver.requests == []


# --- accuracy --------------------------------------------------------------------------------


def test_low_accuracy_fires_once_per_crossing_and_only_on_enough_labels(
    alerting: Factory,
) -> None:
    with receiving() as receiver:
        a = alerting(
            [webhook(receiver)],
            alert_min_accuracy=0.9,
            alert_accuracy_min_labelled=100,
            alert_accuracy_window_s=3600,
        )
        devices = [a.server.enroll()["device_id"] for _ in range(2)]
        for device_id in devices:
            accuracy(a.state, device_id, "2.0.0", 40, 20, a.clock.now)  # 50 %, 80 labels
            accuracy(a.state, device_id, "1.0.0", 100, 99, a.clock.now)  # fine
        a.tick()
        assert receiver.requests == []  # 80 labels: too few to say

        accuracy(a.state, devices[0], "2.0.0", 40, 20, a.clock.advance(60))
        a.tick()
        a.tick()
        [body] = receiver.bodies()
        assert body["kind"] == "model.accuracy_low"
        assert body["data"] == {
            "model_name": "tabular",
            "model_version": "2.0.0",
            "accuracy": 0.5,
            "threshold": 0.9,
            "labelled": 120,
            "correct": 60,
            "devices": 2,
            "window_s": 3600,
            "min_labelled": 100,
        }

        # The bad windows age out and good ones come in: recovered, so it re-arms.
        a.clock.advance(3601)
        for device_id in devices:
            accuracy(a.state, device_id, "2.0.0", 100, 95, a.clock.now)
        a.tick()
        assert len(receiver.requests) == 1
        assert a.alerts("model.accuracy_low")[0].resolved_at is not None

        a.clock.advance(3600)
        accuracy(a.state, devices[1], "2.0.0", 200, 100, a.clock.now)
        a.tick()
        a.tick()
        assert [b["data"]["model_version"] for b in receiver.bodies()] == ["2.0.0"] * 2


# --- delivery --------------------------------------------------------------------------------


def test_a_failing_receiver_is_retried_with_backoff_and_gets_the_alert_once(
    alerting: Factory,
) -> None:
    with receiving(script=[500, 503]) as receiver:
        a = alerting([webhook(receiver)], webhook_backoff_s=10, webhook_max_attempts=5)
        add_model(a.state)
        act(a, create_rollout(a), "pause")
        a.tick()  # attempt 1: 500
        [delivery] = a.deliveries()
        assert (delivery.attempts, delivery.last_error) == (1, "HTTP 500: receiver says no")
        a.dispatcher.deliver_all()
        assert len(receiver.requests) == 1  # not before the backoff
        a.clock.advance(10)
        a.dispatcher.deliver_all()  # attempt 2: 503, then 20 s
        a.clock.advance(19)
        a.dispatcher.deliver_all()
        assert len(receiver.requests) == 2
        a.clock.advance(1)
        a.dispatcher.deliver_all()  # attempt 3: 200
        a.clock.advance(3600)
        a.tick()
        assert len(receiver.requests) == 3
        assert len({r.body for r in receiver.requests}) == 1  # the same event every time
        assert [r.headers["X-Edgefleet-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
        assert all(verify_signature(SECRET, r.body, r.headers) for r in receiver.requests)
        [delivery] = a.deliveries()
        assert delivery.attempts == 3
        assert delivery.delivered_at is not None
        assert (delivery.next_attempt_at, delivery.last_error) == (None, None)


def test_a_receiver_failing_every_time_is_given_up_after_the_last_attempt(
    alerting: Factory,
) -> None:
    with receiving(default=500) as receiver:
        a = alerting([webhook(receiver)], webhook_backoff_s=1, webhook_max_attempts=3)
        add_model(a.state)
        act(a, create_rollout(a), "pause")
        for _ in range(10):
            a.tick()
            a.clock.advance(3600)
        assert len(receiver.requests) == 3
        [delivery] = a.deliveries()
        assert (delivery.attempts, delivery.delivered_at, delivery.next_attempt_at) == (
            3,
            None,
            None,
        )
        assert delivery.last_error == "HTTP 500: receiver says no"


def test_dead_and_hanging_webhooks_hold_up_neither_a_healthy_one_nor_the_api(
    alerting: Factory,
) -> None:
    with receiving() as hanging, receiving() as healthy:
        hanging.hold.clear()  # takes the request and does not answer until released
        a = alerting(
            [
                webhook(closed_port_url(), name="dead"),
                webhook(hanging, name="hanging"),
                webhook(healthy, name="healthy"),
            ],
            webhook_timeout_s=30,
        )
        add_model(a.state)
        rollout_id = create_rollout(a)
        act(a, rollout_id, "pause")
        a.dispatcher.start(loop=False)  # the webhooks' workers, woken by tick() by hand
        a.dispatcher.tick()

        assert healthy.wait_for(1)
        assert hanging.wait_for(1)
        assert a.dispatcher.wait_idle("healthy", 10)
        assert a.dispatcher.wait_idle("dead", 10)
        # The API answers and writes (SQLite would refuse a write while a delivery held
        # a transaction open) while one receiver still has its request.
        assert not hanging.hold.is_set()
        assert a.server.client.get("/healthz").json()["database"] == "ok"
        act(a, rollout_id, "resume")
        by_webhook = {d.webhook: d for d in a.deliveries()}
        assert by_webhook["healthy"].delivered_at is not None
        assert by_webhook["dead"].delivered_at is None
        assert (by_webhook["dead"].last_error or "").startswith("connection failed")
        assert by_webhook["dead"].next_attempt_at is not None  # to be retried
        assert by_webhook["hanging"].delivered_at is None

        hanging.hold.set()
        assert a.dispatcher.wait_idle("hanging", 30)
        by_webhook = {d.webhook: d for d in a.deliveries()}
        assert by_webhook["hanging"].delivered_at is not None
        assert len(healthy.requests) == 1
        a.dispatcher.stop()


# --- replicas and the lifespan ---------------------------------------------------------------


def test_two_replicas_on_one_database_raise_and_deliver_each_alert_once(
    alerting: Factory,
) -> None:
    with receiving() as receiver:
        a = alerting([webhook(receiver)], alert_offline_after_s=60)
        # A second server process: its own engine and sessions on the same database.
        other_state = build_state(a.server.settings, migrate=False)
        replicas = [
            a.dispatcher,
            AlertDispatcher(other_state.settings, other_state.sessions, clock=a.clock),
        ]
        try:
            add_model(a.state)
            act(a, create_rollout(a), "pause")
            device_id = a.server.enroll()["device_id"]
            availability(a.state, device_id, "offline", a.clock.now)
            a.clock.advance(61)

            errors: list[Exception] = []
            for _ in range(3):
                start = threading.Barrier(len(replicas))

                def run(replica: AlertDispatcher, start: threading.Barrier = start) -> None:
                    try:
                        start.wait(10)
                        replica.raise_alerts()
                        replica.deliver_all()
                    except Exception as error:
                        errors.append(error)

                threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30)
                assert errors == []
        finally:
            other_state.engine.dispose()

        assert sorted(b["kind"] for b in receiver.bodies()) == ["device.offline", "rollout.paused"]
        with a.state.sessions() as session:
            assert session.scalar(select(func.count()).select_from(Alert)) == 2


def test_a_replica_that_read_before_another_raised_does_not_raise_again(
    alerting: Factory,
) -> None:
    """The race the threads above may or may not hit, set up by hand: replica B looked
    for open alerts before replica A raised and committed one."""
    a = alerting([webhook("http://127.0.0.1:9/unused")], alert_offline_after_s=60)
    device_id = a.server.enroll()["device_id"]
    availability(a.state, device_id, "offline", a.clock.now)
    now = a.clock.advance(61)
    webhooks = a.server.settings.webhooks
    with a.state.sessions() as session:
        stale_open: set[str] = store.open_subjects(session, AlertKind.DEVICE_OFFLINE)
        condition = detect.offline_devices(session, now, 60, stale_open)
    assert stale_open == set()
    assert list(condition.holding) == [device_id]
    with transaction(a.state.sessions) as session:  # replica A
        assert store.apply_condition(session, condition, stale_open, now, webhooks) == 1
    with transaction(a.state.sessions) as session:  # replica B, on what it read before
        assert store.apply_condition(session, condition, stale_open, now, webhooks) == 0
    assert len(a.alerts("device.offline")) == 1


def test_a_claimed_delivery_waits_for_its_lease_and_a_late_answer_does_not_count(
    alerting: Factory,
) -> None:
    a = alerting([webhook("http://127.0.0.1:9/unused", name="hook")], webhook_timeout_s=5)
    add_model(a.state)
    act(a, create_rollout(a), "pause")
    assert a.dispatcher.raise_alerts() == 1
    lease = dt.timedelta(seconds=60)
    with transaction(a.state.sessions) as session:  # replica A starts posting
        first = store.claim_next(session, "hook", a.clock.now, lease)
    assert first is not None
    assert first.attempt == 1
    with transaction(a.state.sessions) as session:  # replica B finds nothing due
        assert store.claim_next(session, "hook", a.clock.advance(59), lease) is None
    with transaction(a.state.sessions) as session:  # A is presumed dead: B takes over
        second = store.claim_next(session, "hook", a.clock.advance(2), lease)
    assert second is not None
    assert (second.attempt, second.event_id) == (2, first.event_id)
    with transaction(a.state.sessions) as session:  # A's answer, too late, is ignored
        store.record_outcome(session, first, "HTTP 500", a.clock.now, a.clock.now)
    with transaction(a.state.sessions) as session:
        store.record_outcome(session, second, None, a.clock.now, None)
    [delivery] = a.deliveries()
    assert (delivery.attempts, delivery.last_error, delivery.next_attempt_at) == (2, None, None)
    assert delivery.delivered_at is not None


def test_the_servers_lifespan_runs_the_dispatcher_and_stops_it(
    database_url: str, tmp_path: Path
) -> None:
    with receiving() as receiver:
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            rollout_interval_s=0,
            alert_interval_s=0.05,
            webhooks=[WebhookConfig.model_validate(webhook(receiver))],
        )
        app = create_app(settings, start_bridge=False)
        with TestClient(app) as client:
            server = Server(client, app.state.fleet, settings)
            admin = server.token(Role.admin)
            a = Alerting(
                server,
                FakeClock(),
                AlertDispatcher(server.state.settings, server.state.sessions),
                admin,
            )
            add_model(a.state)
            act(a, create_rollout(a), "pause")
            assert receiver.wait_for(1, timeout=30)
            assert "alerts" in {t.name for t in threading.enumerate()}
        assert "alerts" not in {t.name for t in threading.enumerate()}
        assert [b["kind"] for b in receiver.bodies()] == ["rollout.paused"]
        assert verify_signature(SECRET, receiver.requests[0].body, receiver.requests[0].headers)
