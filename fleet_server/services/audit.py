"""The audit log: who did what, when. Written in the same transaction as the action."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from fleet_server.tables import AuditEvent


def record(session: Session, actor: str, action: str, target: str | None, **details: Any) -> None:
    session.add(AuditEvent(actor=actor, action=action, target=target, details=details))
