"""API tokens and enrolment tokens."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.auth import (
    API_TOKEN_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    Role,
    new_secret,
    secret_hash,
)
from fleet_server.errors import NotFound, Refused, Rejected
from fleet_server.services import audit
from fleet_server.tables import ApiToken, EnrollmentToken, aware, utcnow


@dataclass(frozen=True)
class Caller:
    """Who is calling the API, and with which role."""

    name: str
    role: Role


def create_api_token(session: Session, role: Role, name: str, actor: str) -> str:
    token = new_secret(API_TOKEN_PREFIX)
    session.add(ApiToken(name=name, role=role.name, token_hash=secret_hash(token)))
    audit.record(session, actor, "token.create", name, role=role.name)
    return token


def list_api_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_api_token(session: Session, token_id: int, actor: str) -> ApiToken:
    """Revoke a token by its id; raises NotFound for an id that never existed. Every
    request it makes afterwards is refused, console sessions included. Revoking twice
    keeps the first time."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no API token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(session, actor, "token.revoke", row.name, id=token_id, role=row.role)
    return row


def authenticate(session: Session, token: str) -> Caller | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == secret_hash(token)))
    if row is None or row.revoked_at is not None:
        return None
    return Caller(row.name, Role[row.role])


def create_enrollment_token(
    session: Session,
    *,
    tags: list[str],
    uses: int,
    expires_in: dt.timedelta | None,
    actor: str,
) -> str:
    if uses < 1:
        raise Rejected("uses must be at least 1")
    token = new_secret(ENROLLMENT_TOKEN_PREFIX)
    expires_at = utcnow() + expires_in if expires_in else None
    session.add(
        EnrollmentToken(
            token_hash=secret_hash(token),
            tags=sorted(set(tags)),
            uses_left=uses,
            expires_at=expires_at,
            created_by=actor,
        )
    )
    audit.record(session, actor, "enrollment.create", None, tags=tags, uses=uses)
    return token


class EnrollmentRefused(Refused):
    """A token that is unknown, used up or expired; the message says which."""


def consume_enrollment_token(session: Session, token: str) -> EnrollmentToken:
    # Row lock on PostgreSQL, so two devices cannot both take the last use.
    row = session.scalar(
        select(EnrollmentToken)
        .where(EnrollmentToken.token_hash == secret_hash(token))
        .with_for_update()
    )
    if row is None:
        raise EnrollmentRefused("unknown enrollment token")
    expires_at = aware(row.expires_at)
    if expires_at is not None and expires_at <= utcnow():
        raise EnrollmentRefused("enrollment token has expired")
    if row.uses_left <= 0:
        raise EnrollmentRefused("enrollment token has been used up")
    row.uses_left -= 1
    return row
