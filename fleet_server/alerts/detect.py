"""Finding what deserves an alert, from the database alone (so every replica, and a
restarted server, sees the same events): rollout events, devices long offline, and model
versions whose accuracy across the fleet is low. Nothing here writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_server.alerts.config import AlertKind
from fleet_server.rollouts.states import EventKind
from fleet_server.tables import AccuracyRow, Alert, Device, Rollout, RolloutEvent, aware

# Rollout event kinds (fleet_server.rollouts) that become alerts. `gates_failed` is not one:
# the controller always records a `paused` or `rolled_back` right after it, and that alert
# carries the failed gates, so one decision makes one alert.
ROLLOUT_KINDS: dict[EventKind, AlertKind] = {
    EventKind.PAUSED: AlertKind.ROLLOUT_PAUSED,
    EventKind.ROLLED_BACK: AlertKind.ROLLOUT_ROLLED_BACK,
    EventKind.ABORTED: AlertKind.ROLLOUT_ABORTED,
}
# How far back rollout events are looked at: enough to cover any outage of the alerting,
# and it spares a server upgraded onto a long history an alert for every old pause.
ROLLOUT_LOOKBACK = dt.timedelta(days=1)
# Bound on the parameters of one IN (...): SQLite refuses very long lists.
CHUNK = 500

T = TypeVar("T")


@dataclass(frozen=True)
class Found:
    """An alert to raise. `key` makes it unique; for conditions it is set when raised."""

    kind: AlertKind
    subject: str
    summary: str
    data: dict[str, Any]
    key: str = ""


@dataclass
class Condition:
    """A condition's state now: where it holds (to be raised unless already open) and where
    it has cleared (open alerts to resolve, which re-arms them). A subject in neither is
    left as it is, e.g. accuracy without enough labels either way."""

    kind: AlertKind
    holding: dict[str, Found] = field(default_factory=dict)
    cleared: set[str] = field(default_factory=set)


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def iso(moment: dt.datetime | None) -> str | None:
    value = aware(moment)
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


# --- rollouts --------------------------------------------------------------------------------


def known_keys(session: Session, keys: Sequence[str]) -> set[str]:
    """Which of these alert keys are raised already."""
    known: set[str] = set()
    for part in chunks(keys):
        known.update(session.scalars(select(Alert.key).where(Alert.key.in_(part))))
    return known


def rollout_event_key(event_id: int) -> str:
    return f"rollout-event:{event_id}"


def rollout_events(session: Session, now: dt.datetime) -> list[Found]:
    """Rollout pauses, rollbacks and aborts recorded in the lookback and not alerted yet,
    in the order they happened."""
    rows = session.execute(
        select(RolloutEvent, Rollout)
        .join(Rollout, Rollout.id == RolloutEvent.rollout_id)
        .where(RolloutEvent.kind.in_(ROLLOUT_KINDS), RolloutEvent.ts >= now - ROLLOUT_LOOKBACK)
        .order_by(RolloutEvent.id)
    ).all()
    known = known_keys(session, [rollout_event_key(event.id) for event, _ in rows])
    found: list[Found] = []
    for event, rollout in rows:
        key = rollout_event_key(event.id)
        if key in known:
            continue
        kind = ROLLOUT_KINDS[event.kind]
        data = {
            "rollout_id": rollout.id,
            "model_name": rollout.model_name,
            "model_version": rollout.model_version,
            "state": event.kind,
            "wave": event.wave,  # from 0, as the API counts
            "reason": event.message,
            "actor": event.details.get("actor"),
            "at": iso(event.ts),
            "failed_gates": _failed_gates(session, event),
        }
        verb = event.kind.replace("_", " ")
        summary = (
            f"rollout {rollout.id} ({rollout.model_name} {rollout.model_version}) {verb}: "
            f"{event.message}"
        )
        found.append(Found(kind, f"rollout:{rollout.id}", summary, data, key))
    return found


def _failed_gates(session: Session, event: RolloutEvent) -> list[dict[str, Any]]:
    """The gates that failed, when a gate failure caused this pause or rollback: the
    controller records `gates_failed` just before, in the same step."""
    before = session.scalar(
        select(RolloutEvent)
        .where(RolloutEvent.rollout_id == event.rollout_id, RolloutEvent.id < event.id)
        .order_by(RolloutEvent.id.desc())
        .limit(1)
    )
    if before is None or before.kind != "gates_failed" or before.wave != event.wave:
        return []
    gates = before.details.get("gates") or []
    return [g for g in gates if isinstance(g, dict) and g.get("verdict") == "fail"]


# --- devices ---------------------------------------------------------------------------------


def offline_devices(
    session: Session, now: dt.datetime, after_s: float, open_subjects: Iterable[str]
) -> Condition:
    """Devices offline for longer than `after_s`.

    Offline is the device's status (its last will or its goodbye, which is what MQTT keeps
    alive for), not mere silence: an agent may send telemetry rarely. An offline device's
    `last_seen_at` is when that news arrived. A device clears once it is no longer offline
    (back online, or decommissioned), not when `last_seen_at` moves: the bridge sees the
    retained `offline` again whenever it reconnects, which moves `last_seen_at` but starts
    no new episode."""
    condition = Condition(AlertKind.DEVICE_OFFLINE)
    cutoff = now - dt.timedelta(seconds=after_s)
    devices = session.scalars(
        select(Device)
        .where(
            Device.status == "offline",
            Device.decommissioned_at.is_(None),
            Device.last_seen_at.is_not(None),
            Device.last_seen_at <= cutoff,
        )
        .order_by(Device.id)
    )
    for device in devices:
        seen = aware(device.last_seen_at)
        if seen is None:  # filtered out above; this tells the type checker
            continue
        offline_for = (now - seen).total_seconds()
        data = {
            "device_id": device.id,
            "name": device.name,
            "tags": [t.tag for t in device.tags],
            "model_name": device.model_name,
            "model_version": device.model_version,
            "last_seen_at": iso(seen),
            "offline_for_s": round(offline_for, 3),
            "threshold_s": after_s,
        }
        summary = (
            f"device {device.id} ({device.name}) offline for {offline_for:.0f} s "
            f"(threshold {after_s:g} s), last seen {iso(seen)}"
        )
        condition.holding[device.id] = Found(condition.kind, device.id, summary, data)
    opened = sorted(set(open_subjects) - set(condition.holding))
    still: set[str] = set()
    for part in chunks(opened):
        still.update(
            session.scalars(
                select(Device.id).where(
                    Device.id.in_(part),
                    Device.status == "offline",
                    Device.decommissioned_at.is_(None),
                )
            )
        )
    condition.cleared = set(opened) - still
    return condition


# --- accuracy --------------------------------------------------------------------------------


def accuracy_subject(model_name: str, model_version: str) -> str:
    return f"{model_name}@{model_version}"  # manifest names and versions carry no "@"


def low_accuracy(
    session: Session, now: dt.datetime, threshold: float, min_labelled: int, window_s: float
) -> Condition:
    """Per model version, correct / labelled over every device's accuracy windows since
    `now - window_s`. Below the threshold on at least `min_labelled` labels holds; at or
    above it on as many clears; fewer labels say nothing either way."""
    condition = Condition(AlertKind.MODEL_ACCURACY_LOW)
    since = now - dt.timedelta(seconds=window_s)
    rows = session.execute(
        select(
            AccuracyRow.model_name,
            AccuracyRow.model_version,
            func.sum(AccuracyRow.labelled),
            func.sum(AccuracyRow.correct),
            func.count(func.distinct(AccuracyRow.device_id)),
        )
        .where(AccuracyRow.ts >= since)
        .group_by(AccuracyRow.model_name, AccuracyRow.model_version)
        .order_by(AccuracyRow.model_name, AccuracyRow.model_version)
    ).all()
    for name, version, labelled_sum, correct_sum, devices in rows:
        labelled, correct = int(labelled_sum or 0), int(correct_sum or 0)
        subject = accuracy_subject(name, version)
        if labelled < min_labelled:
            continue
        accuracy = correct / labelled
        if accuracy >= threshold:
            condition.cleared.add(subject)
            continue
        data = {
            "model_name": name,
            "model_version": version,
            "accuracy": round(accuracy, 6),
            "threshold": threshold,
            "labelled": labelled,
            "correct": correct,
            "devices": int(devices),
            "window_s": window_s,
            "min_labelled": min_labelled,
        }
        summary = (
            f"{name} {version}: accuracy {accuracy:.2%} across {devices} device(s) over the "
            f"last {window_s:g} s, below {threshold:.2%} ({correct}/{labelled} labels)"
        )
        condition.holding[subject] = Found(condition.kind, subject, summary, data)
    return condition
