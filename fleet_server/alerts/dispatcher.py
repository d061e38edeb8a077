"""The alerts' threads: one looks for alerts every `alert_interval_s`, and each webhook
has a worker of its own that posts its deliveries, so a dead or slow receiver delays no
one but itself, and nothing here runs on the API's, the ingest's or the rollout
controller's threads."""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from fleet_server.alerts import detect, store
from fleet_server.alerts.config import AlertKind, WebhookConfig
from fleet_server.alerts.deliver import Clock, deliver_due
from fleet_server.db import transaction
from fleet_server.settings import Settings
from fleet_server.tables import utcnow

log = logging.getLogger(__name__)


def raise_alerts(settings: Settings, sessions: sessionmaker[Session], now: dt.datetime) -> int:
    """Look for every kind of alert once; the number newly raised. Each kind in its own
    transaction, and one failing (a query error, a deadlock between replicas) is logged
    and does not hold the others back: the next round tries it again."""
    webhooks = settings.webhooks

    def rollouts(session: Session) -> int:
        return store.raise_events(session, detect.rollout_events(session, now), now, webhooks)

    def offline(session: Session) -> int:
        if settings.alert_offline_after_s is None:
            return 0
        opened = store.open_subjects(session, AlertKind.DEVICE_OFFLINE)
        condition = detect.offline_devices(session, now, settings.alert_offline_after_s, opened)
        return store.apply_condition(session, condition, opened, now, webhooks)

    def accuracy(session: Session) -> int:
        if settings.alert_min_accuracy is None:
            return 0
        opened = store.open_subjects(session, AlertKind.MODEL_ACCURACY_LOW)
        condition = detect.low_accuracy(
            session,
            now,
            settings.alert_min_accuracy,
            settings.alert_accuracy_min_labelled,
            settings.alert_accuracy_window_s,
        )
        return store.apply_condition(session, condition, opened, now, webhooks)

    raised = 0
    for look in (rollouts, offline, accuracy):
        try:
            with transaction(sessions) as session:
                raised += look(session)
        except Exception:
            log.exception("looking for %s alerts failed", look.__name__)
    return raised


class _Worker:
    """Posts one webhook's due deliveries whenever woken; at most one round at a time."""

    def __init__(self, dispatcher: AlertDispatcher, webhook: WebhookConfig) -> None:
        self.dispatcher = dispatcher
        self.webhook = webhook
        self.wake = threading.Event()
        self.idle = threading.Condition()
        self.busy = False
        self.thread = threading.Thread(
            target=self._run, name=f"webhook-{webhook.label}", daemon=True
        )

    def _run(self) -> None:
        stopping = self.dispatcher.stopping
        while True:
            self.wake.wait()
            if stopping.is_set():
                return
            with self.idle:
                self.wake.clear()
                self.busy = True
            try:
                self.dispatcher.deliver(self.webhook)
            except Exception:
                log.exception("webhook %s: delivery round failed", self.webhook.label)
            finally:
                with self.idle:
                    self.busy = False
                    self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: not self.busy and not self.wake.is_set(), timeout)


class AlertDispatcher:
    """Looks for alerts and posts them. `start()` runs it on threads (the server's
    lifespan does); tests may instead call `raise_alerts` and `deliver` by hand, or start
    only the workers (`start(loop=False)`) and drive `tick` themselves."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], *, clock: Clock = utcnow
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.stopping = threading.Event()
        self._workers = {w.label: _Worker(self, w) for w in self.settings.webhooks}
        self._loop = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._started = False

    def start(self, *, loop: bool = True) -> None:
        for worker in self._workers.values():
            worker.thread.start()
        if loop and self.settings.alert_interval_s > 0:
            self._loop.start()
        self._started = True

    def stop(self) -> None:
        self.stopping.set()
        for worker in self._workers.values():
            worker.wake.set()
        if self._loop.is_alive():
            self._loop.join(10)
        # A worker in the middle of a POST finishes that one and stops; they are daemon
        # threads, so a receiver stuck past this wait does not keep the process alive.
        for worker in self._workers.values():
            if worker.thread.is_alive():
                worker.thread.join(self.settings.webhook_timeout_s + 5)

    def _run(self) -> None:
        while not self.stopping.wait(self.settings.alert_interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("alerts tick failed")

    def tick(self) -> None:
        """Look for alerts, then wake every webhook's worker for what is due."""
        raised = self.raise_alerts()
        if raised:
            log.info("raised %d alert(s)", raised)
        if self._started:
            for worker in self._workers.values():
                worker.wake.set()

    def raise_alerts(self, now: dt.datetime | None = None) -> int:
        return raise_alerts(self.settings, self.sessions, now or self.clock())

    def deliver(self, webhook: WebhookConfig) -> int:
        """Post this webhook's due deliveries now, on the calling thread."""
        return deliver_due(
            self.sessions, webhook, self.settings, self.clock, stopping=self.stopping
        )

    def deliver_all(self) -> int:
        """Every webhook's due deliveries, one webhook after another, on the calling thread:
        for tests and tools; the server's workers post them in parallel."""
        return sum(self.deliver(w) for w in self.settings.webhooks)

    def wait_idle(self, label: str, timeout: float) -> bool:
        """Whether the webhook's worker finished its rounds within `timeout` seconds."""
        return self._workers[label].wait_idle(timeout)
