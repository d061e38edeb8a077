"""API tokens: admins list them and revoke them (creating one stays on the command line,
where the secret is printed once to whoever holds the data dir)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from fleet_server.api.deps import Admin, SessionDep
from fleet_server.schemas import ApiTokenRead
from fleet_server.services.tokens import list_api_tokens, revoke_api_token
from fleet_server.tables import ApiToken

router = APIRouter(prefix="/api/v1", tags=["tokens"])


def _read(row: ApiToken) -> ApiTokenRead:
    return ApiTokenRead(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


@router.get("/tokens", response_model=list[ApiTokenRead])
def list_tokens(session: SessionDep, _: Admin) -> list[ApiTokenRead]:
    return [_read(row) for row in list_api_tokens(session)]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(token_id: int, session: SessionDep, caller: Admin) -> Response:
    """Refused from the next request on, console sessions included."""
    revoke_api_token(session, token_id, caller.name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
