"""The alerts table: raising an alert exactly once, resolving conditions, and the
deliveries' claims and outcomes. Every write that two replicas could race on is decided
by the database (a unique key, or a compare-and-set on the attempt count)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fleet_server.alerts.config import AlertKind, WebhookConfig
from fleet_server.alerts.detect import Condition, Found, chunks
from fleet_server.tables import Alert, AlertDelivery


def raise_once(
    session: Session, found: Found, now: dt.datetime, webhooks: Sequence[WebhookConfig]
) -> bool:
    """Insert the alert and its deliveries; False, and nothing written, when its key is
    already there (raised before, or by another replica at this very moment)."""
    table = cast(Table, Alert.__table__)
    values: dict[str, Any] = {
        "key": found.key,
        "event_id": uuid.uuid4().hex,
        "kind": found.kind,
        "subject": found.subject,
        "summary": found.summary,
        "data": found.data,
        "raised_at": now,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    # ON CONFLICT DO NOTHING waits for a concurrent insert of the same key to commit and
    # then does nothing: the database, not a read before the write, decides who raised it.
    alert_id = session.scalar(
        insert.values(**values).on_conflict_do_nothing().returning(table.c.id)
    )
    if alert_id is None:
        return False
    for webhook in webhooks:
        if webhook.wants(found.kind):
            session.add(
                AlertDelivery(
                    alert_id=alert_id, webhook=webhook.label, attempts=0, next_attempt_at=now
                )
            )
    return True


def raise_events(
    session: Session, events: Sequence[Found], now: dt.datetime, webhooks: Sequence[WebhookConfig]
) -> int:
    return sum(raise_once(session, found, now, webhooks) for found in events)


def open_subjects(session: Session, kind: AlertKind) -> set[str]:
    return set(
        session.scalars(
            select(Alert.subject).where(Alert.kind == kind, Alert.resolved_at.is_(None))
        )
    )


def apply_condition(
    session: Session,
    condition: Condition,
    already_open: set[str],
    now: dt.datetime,
    webhooks: Sequence[WebhookConfig],
) -> int:
    """Resolve what cleared, raise what holds and is not open; the number raised.

    A condition's n-th episode on a subject has the key `kind:subject:n`. Whether one is
    open and how many there were come from one statement, so from one snapshot: two
    replicas reading the same state pick the same key (and the unique key lets one of
    them in), and one reading after the other committed sees that alert open."""
    cleared = sorted(condition.cleared & already_open)
    for part in chunks(cleared):
        session.execute(
            update(Alert)
            .where(
                Alert.kind == condition.kind,
                Alert.subject.in_(part),
                Alert.resolved_at.is_(None),
            )
            .values(resolved_at=now)
        )
    raised = 0
    for part in chunks(sorted(condition.holding)):  # sorted: replicas lock keys in one order
        history = {
            subject: (episodes, int(still_open or 0))
            for subject, episodes, still_open in session.execute(
                select(
                    Alert.subject,
                    func.count(),
                    func.sum(case((Alert.resolved_at.is_(None), 1), else_=0)),
                )
                .where(Alert.kind == condition.kind, Alert.subject.in_(part))
                .group_by(Alert.subject)
            )
        }
        for subject in part:
            episodes, still_open = history.get(subject, (0, 0))
            if still_open:
                continue
            found = condition.holding[subject]
            key = f"{condition.kind}:{subject}:{episodes + 1}"
            raised += raise_once(
                session,
                Found(found.kind, found.subject, found.summary, found.data, key),
                now,
                webhooks,
            )
    return raised


# --- deliveries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A delivery this process may now attempt: attempt number `attempt`."""

    alert_id: int
    webhook: str
    attempt: int
    event_id: str
    kind: str
    summary: str
    data: dict[str, Any]
    raised_at: dt.datetime


def claim_next(
    session: Session, webhook: str, now: dt.datetime, lease: dt.timedelta
) -> Claimed | None:
    """The oldest due delivery to `webhook`, claimed: its attempt counted and its next
    attempt moved past the lease, so no other replica takes it while this one posts. If
    this process dies mid-post, the lease runs out and someone tries again."""
    while True:
        row = session.execute(
            select(AlertDelivery, Alert)
            .join(Alert, Alert.id == AlertDelivery.alert_id)
            .where(AlertDelivery.webhook == webhook, AlertDelivery.next_attempt_at <= now)
            .order_by(AlertDelivery.next_attempt_at, AlertDelivery.alert_id)
            .limit(1)
        ).first()
        if row is None:
            return None
        delivery, alert = row
        seen = delivery.attempts
        taken = session.execute(
            update(AlertDelivery)
            .where(
                AlertDelivery.alert_id == delivery.alert_id,
                AlertDelivery.webhook == webhook,
                AlertDelivery.attempts == seen,
                AlertDelivery.next_attempt_at <= now,
            )
            .values(attempts=seen + 1, next_attempt_at=now + lease)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return Claimed(
                alert.id,
                webhook,
                seen + 1,
                alert.event_id,
                alert.kind,
                alert.summary,
                alert.data,
                alert.raised_at,
            )
        session.expire_all()  # another replica took it first: look again


def record_outcome(
    session: Session,
    claimed: Claimed,
    error: str | None,
    now: dt.datetime,
    retry_at: dt.datetime | None,
) -> None:
    """Delivered (error None), to be retried at `retry_at`, or given up (retry_at None).
    Guarded by the attempt number: if the lease ran out and another replica has claimed
    the delivery since, its outcome is the one that counts."""
    values: dict[str, Any] = (
        {"delivered_at": now, "next_attempt_at": None, "last_error": None}
        if error is None
        else {"next_attempt_at": retry_at, "last_error": error[:1000]}
    )
    session.execute(
        update(AlertDelivery)
        .where(
            AlertDelivery.alert_id == claimed.alert_id,
            AlertDelivery.webhook == claimed.webhook,
            AlertDelivery.attempts == claimed.attempt,
            AlertDelivery.delivered_at.is_(None),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
