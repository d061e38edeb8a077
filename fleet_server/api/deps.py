"""Who is calling: bearer tokens with roles for people and pipelines, Basic for devices."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from sqlalchemy.orm import Session

from fleet_server.auth import Role
from fleet_server.services.devices import authenticate_device
from fleet_server.services.tokens import Caller, authenticate
from fleet_server.state import FleetState
from fleet_server.tables import Device

_bearer = HTTPBearer(auto_error=False)
_basic = HTTPBasic(auto_error=False, realm="edgefleet devices")


def get_state(request: Request) -> FleetState:
    state: FleetState = request.app.state.fleet
    return state


StateDep = Annotated[FleetState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    """One transaction per request: committed on success, rolled back on any error, so a
    rejected request changes nothing."""
    with state.sessions() as session, session.begin():
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _unauthorized(detail: str, scheme: str = "Bearer") -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, {"WWW-Authenticate": scheme})


def require(role: Role) -> Callable[..., Caller]:
    def dependency(
        session: SessionDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Caller:
        if credentials is None:
            raise _unauthorized("missing bearer token")
        caller = authenticate(session, credentials.credentials)
        if caller is None:
            raise _unauthorized("unknown or revoked token")
        if caller.role < role:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"needs the {role.name} role, token has {caller.role.name}",
            )
        return caller

    return dependency


Viewer = Annotated[Caller, Depends(require(Role.viewer))]
Operator = Annotated[Caller, Depends(require(Role.operator))]
Admin = Annotated[Caller, Depends(require(Role.admin))]


def current_device(
    session: SessionDep,
    credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> Device:
    if credentials is None:
        raise _unauthorized("device credentials required", 'Basic realm="edgefleet devices"')
    device = authenticate_device(session, credentials.username, credentials.password)
    if device is None:
        raise _unauthorized("unknown device or wrong secret", 'Basic realm="edgefleet devices"')
    return device


DeviceDep = Annotated[Device, Depends(current_device)]
