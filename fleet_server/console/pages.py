"""The console's pages: HTML rendered on the server, over the same services as the API."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request, Response, status
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from fleet_server.api.deps import SessionDep, StateDep
from fleet_server.api.errors import status_of
from fleet_server.console import charts, queries
from fleet_server.console.session import (
    COOKIE,
    MAX_AGE_S,
    ConsoleError,
    SignedIn,
    Viewer,
    check_form,
    require_operator,
    safe_next,
)
from fleet_server.errors import ServiceError
from fleet_server.rollouts import controller, service
from fleet_server.rollouts.gates import AT_LEAST
from fleet_server.rollouts.read_model import GateRead, list_rollouts, rollout_detail, rollout_read
from fleet_server.rollouts.states import Action
from fleet_server.services import devices as device_service
from fleet_server.services.field import field_performance
from fleet_server.services.tokens import authenticate
from fleet_server.state import FleetState
from fleet_server.tables import utcnow

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals.update(gate_bar=charts.gate_bar, share_bar=charts.share_bar)
templates.env.filters["when"] = lambda moment: (
    moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"
)

PAGE_SIZE = 50
# The window the models page reads field performance over.
FIELD_WINDOW = dt.timedelta(hours=1)

router = APIRouter(include_in_schema=False)


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    # Everything a page uses comes from this server; a browser refuses anything else.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# --- signing in and out -------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, next: str | None = None) -> Response:
    return render(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    token: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    caller = authenticate(session, token.strip())
    if caller is None:
        return render(
            request,
            "login.html",
            {"next": safe_next(next), "error": "That token is unknown or revoked."},
            status.HTTP_401_UNAUTHORIZED,
        )
    response = RedirectResponse(safe_next(next), status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        COOKIE,
        token.strip(),
        max_age=MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout(viewer: SignedIn, csrf: Annotated[str, Form()]) -> Response:
    check_form(viewer, csrf)
    response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(COOKIE)
    return response


# --- pages --------------------------------------------------------------------------------


@router.get("/")
def overview_page(request: Request, session: SessionDep, viewer: SignedIn) -> Response:
    now = utcnow()
    fleet = queries.overview(session, now)
    summaries = [rollout_read(session, r) for r in fleet.active_rollouts]
    return render(
        request,
        "overview.html",
        {"viewer": viewer, "fleet": fleet, "rollouts": summaries, "page": "overview"},
    )


@router.get("/devices")
def devices_page(
    request: Request,
    session: SessionDep,
    viewer: SignedIn,
    tag: str | None = None,
    status_: Annotated[Literal["", "online", "offline"], Query(alias="status")] = "",
    version: str | None = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    rows, total = device_service.list_devices(
        session,
        tag=tag or None,
        status=status_ or None,
        model_version=version or None,
        limit=PAGE_SIZE,
        offset=(page - 1) * PAGE_SIZE,
    )
    pages = max(1, math.ceil(total / PAGE_SIZE))
    filters = {"tag": tag or "", "status": status_, "version": version or ""}
    return render(
        request,
        "devices.html",
        {
            "viewer": viewer,
            "devices": rows,
            "total": total,
            "page_number": page,
            "pages": pages,
            "filters": filters,
            "page": "devices",
        },
    )


@router.get("/devices/{device_id}")
def device_page(
    request: Request,
    device_id: str,
    session: SessionDep,
    viewer: SignedIn,
    range_: Annotated[Literal["15m", "1h", "6h", "24h", "7d"], Query(alias="range")] = "1h",
) -> Response:
    device = device_service.get_device(session, device_id)
    if device is None:
        raise ConsoleError(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    now = utcnow()
    series = queries.device_charts(session, device.id, queries.RANGES[range_], now)

    def chart(lines: list[charts.Series], title: str, **kwargs: Any) -> Any:
        return charts.line_chart(lines, series.start, series.end, title=title, **kwargs)

    panels = [
        ("CPU and memory", chart(series.health, "CPU and memory", unit=" %", y_max=100.0)),
        ("Temperature", chart(series.temperature, "Temperature", unit=" °C")),
        ("Inference latency", chart(series.latency, "Inference latency", unit=" ms")),
        ("Throughput", chart(series.throughput, "Throughput", unit="/s")),
        ("Accuracy from feedback", chart(series.accuracy, "Accuracy", y_max=1.0)),
        ("Input drift", chart(series.drift, "Input drift")),
    ]
    return render(
        request,
        "device.html",
        {
            "viewer": viewer,
            "device": device,
            "panels": panels,
            "range": range_,
            "ranges": list(queries.RANGES),
            "history": queries.update_history(session, device.id),
            "page": "devices",
        },
    )


@router.get("/models")
def models_page(request: Request, session: SessionDep, viewer: SignedIn) -> Response:
    field = {
        (f.model_name, f.model_version): f
        for f in field_performance(session, utcnow() - FIELD_WINDOW)
    }
    return render(
        request,
        "models.html",
        {
            "viewer": viewer,
            "models": queries.model_rows(session),
            "field": field,
            "window_minutes": int(FIELD_WINDOW.total_seconds() // 60),
            "page": "models",
        },
    )


@router.get("/rollouts")
def rollouts_page(request: Request, session: SessionDep, viewer: SignedIn) -> Response:
    rows = [rollout_read(session, r) for r in list_rollouts(session)]
    return render(
        request, "rollouts.html", {"viewer": viewer, "rollouts": rows, "page": "rollouts"}
    )


def _rollout_context(
    session: Session, state: FleetState, rollout_id: int, viewer: Viewer
) -> dict[str, Any]:
    try:
        detail = rollout_detail(session, rollout_id, state.live_gates)
    except ServiceError as exc:
        raise ConsoleError(status_of(exc), str(exc)) from None
    # Between waves and after the end there is nothing to judge now: the page shows the
    # gates as they stood at the last decision, which says why the rollout went where it did.
    decided = next((e for e in reversed(detail.events) if e.details.get("gates")), None)
    gates = detail.gates
    if not gates and decided is not None:
        gates = [GateRead.model_validate(g) for g in decided.details["gates"]]
    return {
        "viewer": viewer,
        "rollout": detail,
        "gates": gates,
        "decided": None if detail.gates else decided,
        "final": detail.state.is_final,
        "at_least": AT_LEAST,
        "page": "rollouts",
    }


@router.get("/rollouts/{rollout_id}")
def rollout_page(
    request: Request, rollout_id: int, session: SessionDep, state: StateDep, viewer: SignedIn
) -> Response:
    return render(request, "rollout.html", _rollout_context(session, state, rollout_id, viewer))


@router.get("/rollouts/{rollout_id}/live")
def rollout_live(
    request: Request, rollout_id: int, session: SessionDep, state: StateDep, viewer: SignedIn
) -> Response:
    """The part of the rollout page that changes, which the page polls while it runs."""
    context = _rollout_context(session, state, rollout_id, viewer)
    return render(request, "rollout_live.html", context)


@router.post("/rollouts/{rollout_id}/act")
def rollout_action(
    rollout_id: int,
    session: SessionDep,
    state: StateDep,
    viewer: SignedIn,
    action: Annotated[Action, Form()],
    csrf: Annotated[str, Form()],
) -> Response:
    require_operator(viewer, csrf)
    try:
        rollout = service.get(session, rollout_id, lock=True)
        controller.act(session, state.desired, rollout, action, viewer.name)
    except ServiceError as exc:
        raise ConsoleError(status_of(exc), str(exc)) from None
    return RedirectResponse(f"/rollouts/{rollout_id}", status.HTTP_303_SEE_OTHER)
