"""Who is looking at the console: the API token a person signed in with, in a cookie.

The cookie holds the token itself, HTTP-only (no script can read it) and SameSite=Strict
(no other site can make the browser send it). Every request checks it against the token
table again, so revoking a token ends its console sessions too, and the roles are the
API's own. Forms also carry a CSRF field derived from the token, for browsers that predate
SameSite.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request, status

from fleet_server.api.deps import SessionDep
from fleet_server.auth import Role
from fleet_server.services.tokens import Caller, authenticate

COOKIE = "edgefleet_session"
# A working day: a console left open overnight asks for the token again.
MAX_AGE_S = 12 * 3600


class SignInRequired(Exception):
    """No valid session: the console answers with the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class ConsoleError(Exception):
    """A request the console refuses: shown as a page with the status and the reason."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def csrf_token(api_token: str) -> str:
    return hashlib.sha256(b"edgefleet-console-csrf:" + api_token.encode()).hexdigest()[:32]


class Viewer:
    """The signed-in person: their name and role, and the CSRF value their forms carry."""

    def __init__(self, caller: Caller, api_token: str) -> None:
        self.name = caller.name
        self.role = caller.role
        self.csrf = csrf_token(api_token)

    @property
    def may_operate(self) -> bool:
        return self.role >= Role.operator


def signed_in(request: Request, session: SessionDep) -> Viewer:
    token = request.cookies.get(COOKIE)
    if not token or (caller := authenticate(session, token)) is None:
        path = request.url.path
        raise SignInRequired(path + (f"?{request.url.query}" if request.url.query else ""))
    return Viewer(caller, token)


SignedIn = Annotated[Viewer, Depends(signed_in)]


def check_form(viewer: Viewer, csrf: str) -> None:
    if not hmac.compare_digest(csrf, viewer.csrf):
        raise ConsoleError(status.HTTP_403_FORBIDDEN, "the form is stale or forged: reload")


def require_operator(viewer: Viewer, csrf: str) -> None:
    """For a form that changes something: the server decides, whatever the page showed."""
    check_form(viewer, csrf)
    if not viewer.may_operate:
        raise ConsoleError(
            status.HTTP_403_FORBIDDEN, f"needs the operator role, you are {viewer.role.name}"
        )


def safe_next(path: str | None) -> str:
    """Where to go after signing in: only a path on this server, never another site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
