"""The fleet web console, served at `/` by `fleet-server serve`."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import FastAPI, Request, Response, status
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from fleet_server.console.pages import HERE, render, router
from fleet_server.console.session import ConsoleError, SignInRequired

# The console's live regions ask with this header, so that an expired session answers
# them with a status rather than a sign-in page pasted into the region.
LIVE_HEADER = "X-Console-Live"


def mount_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, exc: SignInRequired) -> Response:
        if request.headers.get(LIVE_HEADER):
            return Response("sign in again", status.HTTP_401_UNAUTHORIZED)
        target = (
            "/login" if exc.next_path == "/" else "/login?" + urlencode({"next": exc.next_path})
        )
        return RedirectResponse(target, status.HTTP_303_SEE_OTHER)

    @app.exception_handler(ConsoleError)
    async def refused(request: Request, exc: ConsoleError) -> Response:
        return render(request, "error.html", {"error": exc}, exc.status_code)
