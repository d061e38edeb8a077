"""The web console over HTTP, on SQLite and PostgreSQL: sessions, roles, forms, and the
aggregated queries its pages draw from. (tests/test_console_browser.py drives it in a real
browser against a real fleet.)"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from sqlalchemy import select

from fleet_server.auth import Role
from fleet_server.console import queries
from fleet_server.console.session import COOKIE
from fleet_server.db import transaction
from fleet_server.services.tokens import revoke_api_token
from fleet_server.tables import (
    AccuracyRow,
    ApiToken,
    Device,
    HealthRow,
    InferenceRow,
    Rollout,
    utcnow,
)
from tests.fleet_server.server.conftest import Server
from tests.fleet_server.server.test_rollouts_api import create, installing, report, step

T0 = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def sign_in(server: Server, role: Role, name: str | None = None) -> str:
    token = server.token(role, name)["Authorization"].removeprefix("Bearer ")
    response = server.client.post(
        "/login", data={"token": token, "next": "/"}, follow_redirects=False
    )
    assert response.status_code == 303
    return token


def csrf(server: Server, page: str = "/") -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', server.client.get(page).text)
    assert found is not None
    return found.group(1)


# --- sessions -------------------------------------------------------------------------------


def test_a_visitor_without_a_session_is_sent_to_sign_in_and_back(server: Server) -> None:
    response = server.client.get("/devices?status=online", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fdevices%3Fstatus%3Donline"
    # A live region asking without a session gets a status, not a sign-in page to paste.
    live = server.client.get("/rollouts/1/live", headers={"X-Console-Live": "1"})
    assert live.status_code == 401


def test_signing_in_sets_an_http_only_strict_cookie_and_goes_where_asked(server: Server) -> None:
    token = server.token(Role.viewer)["Authorization"].removeprefix("Bearer ")
    response = server.client.post(
        "/login", data={"token": token, "next": "/models"}, follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/models"
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith(f"{COOKIE}=")
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert server.client.get("/models").status_code == 200


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil"])
def test_signing_in_never_sends_the_browser_to_another_site(server: Server, target: str) -> None:
    token = server.token(Role.viewer)["Authorization"].removeprefix("Bearer ")
    response = server.client.post(
        "/login", data={"token": token, "next": target}, follow_redirects=False
    )
    assert response.headers["location"] == "/"


def test_a_wrong_token_is_refused_with_a_reason_and_no_cookie(server: Server) -> None:
    response = server.client.post("/login", data={"token": "efa_nope"}, follow_redirects=False)
    assert response.status_code == 401
    assert "unknown or revoked" in response.text
    assert "set-cookie" not in response.headers


def test_a_revoked_token_ends_its_console_sessions(server: Server) -> None:
    sign_in(server, Role.viewer, "leaver")
    assert server.client.get("/", follow_redirects=False).status_code == 200
    with transaction(server.state.sessions) as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "leaver"))
        assert row is not None
        revoke_api_token(session, row.id, actor="test")
    assert server.client.get("/", follow_redirects=False).status_code == 303


def test_signing_out_needs_the_form_and_clears_the_cookie(server: Server) -> None:
    sign_in(server, Role.viewer)
    forged = server.client.post("/logout", data={"csrf": "0" * 32}, follow_redirects=False)
    assert forged.status_code == 403
    response = server.client.post("/logout", data={"csrf": csrf(server)}, follow_redirects=False)
    assert response.status_code == 303
    assert server.client.get("/", follow_redirects=False).status_code == 303


def test_every_page_sends_a_policy_that_keeps_it_to_this_server(server: Server) -> None:
    sign_in(server, Role.viewer)
    for page in ("/", "/devices", "/models", "/rollouts", "/login"):
        response = server.client.get(page)
        assert response.status_code == 200, page
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        # Nothing on the page comes from elsewhere.
        assert not re.search(r'(src|href)="(https?:)?//', response.text), page


def test_the_api_docs_are_served_from_this_server(server: Server) -> None:
    page = server.client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert assets, "the page names its script, style and icon"
    for asset in assets:
        assert asset.startswith("/"), asset
        assert server.client.get(asset).status_code == 200, asset


def test_unknown_device_and_rollout_are_404_pages(server: Server) -> None:
    sign_in(server, Role.viewer)
    for page in ("/devices/dev-nope", "/rollouts/999"):
        response = server.client.get(page)
        assert response.status_code == 404
        assert "text/html" in response.headers["content-type"]
    assert server.client.get("/devices?status=bogus").status_code == 422


def test_what_a_device_names_itself_is_shown_escaped(server: Server) -> None:
    enrolled = server.enroll(name="<script>alert(1)</script>")
    sign_in(server, Role.viewer)
    page = server.client.get("/devices").text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;script&gt;" in server.client.get(f"/devices/{enrolled['device_id']}").text


def test_the_devices_table_filters_and_pages(server: Server) -> None:
    for _ in range(3):
        server.enroll(token=server.enrollment(tags=["lab"]))
    server.enroll(token=server.enrollment(tags=["field"]))
    sign_in(server, Role.viewer)
    lab = server.client.get("/devices?tag=lab").text
    assert "3 device(s)" in lab
    assert lab.count('<a class="tag" href="/devices?tag=lab">') == 3
    assert "0 device(s)" in server.client.get("/devices?status=online").text
    with transaction(server.state.sessions) as session:
        for i in range(60):
            session.add(Device(id=f"dev-bulk{i:03}", name=f"bulk {i}", secret_hash="x" * 64))
    first = server.client.get("/devices").text
    assert "page 1 of 2" in first
    last = server.client.get("/devices?page=2").text
    assert len(re.findall(r'<td><a href="/devices/dev-', last)) == 64 - 50


# --- operators and viewers ------------------------------------------------------------------


def rollout_state(server: Server, rollout_id: int) -> str:
    with server.state.sessions() as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        return rollout.state


def test_an_operator_pauses_and_resumes_through_the_form(
    server: Server,
    lab: dict[str, Any],
) -> None:
    created = create(server, lab["admin"])
    sign_in(server, Role.operator)
    page = server.client.get(f"/rollouts/{created['id']}").text
    assert 'value="pause"' in page
    form = {"action": "pause", "csrf": csrf(server)}
    response = server.client.post(
        f"/rollouts/{created['id']}/act", data=form, follow_redirects=False
    )
    assert response.status_code == 303
    assert rollout_state(server, created["id"]) == "paused"
    again = server.client.post(f"/rollouts/{created['id']}/act", data=form)
    assert again.status_code == 409
    assert rollout_state(server, created["id"]) == "paused"
    form["action"] = "resume"
    assert server.client.post(f"/rollouts/{created['id']}/act", data=form).status_code == 200
    assert rollout_state(server, created["id"]) == "running"


def test_a_viewer_gets_no_buttons_and_a_forced_action_is_refused(
    server: Server,
    lab: dict[str, Any],
) -> None:
    created = create(server, lab["admin"])
    sign_in(server, Role.viewer)
    page = server.client.get(f"/rollouts/{created['id']}").text
    assert '<button name="action"' not in page
    forced = server.client.post(
        f"/rollouts/{created['id']}/act", data={"action": "abort", "csrf": csrf(server)}
    )
    assert forced.status_code == 403
    assert "needs the operator role" in forced.text
    assert rollout_state(server, created["id"]) == "running"


def test_an_action_without_the_session_s_form_value_is_refused(
    server: Server,
    lab: dict[str, Any],
) -> None:
    created = create(server, lab["admin"])
    sign_in(server, Role.operator)
    forged = server.client.post(
        f"/rollouts/{created['id']}/act", data={"action": "pause", "csrf": "f" * 32}
    )
    assert forged.status_code == 403
    assert rollout_state(server, created["id"]) == "running"


def test_a_finished_rollout_shows_the_gates_of_its_last_decision(
    server: Server,
    lab: dict[str, Any],
) -> None:
    rollout_id = create(server, lab["admin"], waves=[{"percent": 100, "bake_s": 0}])["id"]
    step(server, rollout_id, T0)
    for member in installing(server, rollout_id):
        report(server, member, "active", T0)
    assert step(server, rollout_id, T0 + dt.timedelta(seconds=1)).state == "completed"
    sign_in(server, Role.viewer)
    page = server.client.get(f"/rollouts/{rollout_id}").text
    assert "Gates at the last decision: gates passed, wave 1" in page
    assert re.search(r"install failure ratio</td>\s*<td><span class=\"verdict pass\">", page)
    assert "data-live" not in page  # over: nothing left to follow


# --- the aggregated queries -----------------------------------------------------------------


def add_device(server: Server, device_id: str, status: str = "online") -> None:
    with transaction(server.state.sessions) as session:
        session.add(Device(id=device_id, name=device_id, secret_hash="x" * 64, status=status))


def test_device_charts_are_bucketed_in_the_database(server: Server) -> None:
    add_device(server, "dev-a")
    add_device(server, "dev-b")
    now = T0
    with transaction(server.state.sessions) as session:
        for device_id, cpu in (("dev-a", 10.0), ("dev-b", 99.0)):
            # Two samples in each of the hour's last two 30 s buckets, none before.
            for i, ago in enumerate((55, 45, 25, 15)):
                ts = now - dt.timedelta(seconds=ago)
                session.add(_health(device_id, ts, cpu=cpu + i))
                session.add(_inference(device_id, ts, count=30, p50=1.0 + i, p95=5.0 * (i + 1)))
                session.add(
                    AccuracyRow(
                        device_id=device_id,
                        ts=ts,
                        model_name="digits",
                        model_version="1.0.0",
                        window_s=10.0,
                        labelled=4,
                        correct=3 if i % 2 else 4,
                    )
                )
    with server.state.sessions() as session:
        charts = queries.device_charts(session, "dev-a", 3600, now)
    width = 3600 // queries.POINTS  # 30 s buckets
    assert charts.end - charts.start == 3600

    def filled(series: list[Any], position: int = 0) -> list[tuple[float, float]]:
        return [(t, v) for t, v in series[position].points if v is not None]

    cpu_line = filled(charts.health)
    # 11:59:05 and :15 fall in one 30 s bucket, :35 and :45 in the next; dev-b's samples
    # are not mixed in.
    assert [v for _, v in cpu_line] == [10.5, 12.5]
    assert all((t - width / 2) % width == 0 for t, _ in cpu_line)
    assert [v for _, v in filled(charts.latency, 0)] == [1.5, 3.5]  # mean of p50s
    assert [v for _, v in filled(charts.latency, 1)] == [10.0, 20.0]  # worst p95
    assert [v for _, v in filled(charts.throughput)] == [60 / width, 60 / width]
    assert [v for _, v in filled(charts.accuracy)] == [7 / 8, 7 / 8]
    # Every other bucket of the hour is there, empty, so lines break where data stops.
    assert len(charts.health[0].points) >= queries.POINTS
    assert len(cpu_line) == 2


def test_failing_health_names_online_devices_over_a_limit(server: Server) -> None:
    for device_id, status in (("dev-hot", "online"), ("dev-ok", "online"), ("dev-gone", "offline")):
        add_device(server, device_id, status)
    now = utcnow()
    with transaction(server.state.sessions) as session:
        session.add(_health("dev-hot", now - dt.timedelta(minutes=1), cpu=50.0, temperature=85.0))
        session.add(_health("dev-ok", now - dt.timedelta(minutes=1), cpu=40.0))
        session.add(_health("dev-gone", now - dt.timedelta(minutes=1), cpu=99.0))
        # An old spike is not today's problem.
        session.add(_health("dev-ok", now - dt.timedelta(hours=2), cpu=100.0))
    with server.state.sessions() as session:
        found = queries.failing_health(session, now)
    assert [(u.device_id, u.problems) for u in found] == [("dev-hot", ["85 °C"])]


def test_the_overview_counts_the_fleet(server: Server) -> None:
    add_device(server, "dev-1")
    add_device(server, "dev-2", "offline")
    with transaction(server.state.sessions) as session:
        device = session.get(Device, "dev-1")
        assert device is not None
        device.model_name, device.model_version = "digits", "1.0.0"
    with server.state.sessions() as session:
        fleet = queries.overview(session, utcnow())
    assert fleet.by_status == {"online": 1, "offline": 1}
    assert fleet.by_version == [("", "", 1), ("digits", "1.0.0", 1)]


def _health(
    device_id: str, ts: dt.datetime, *, cpu: float, temperature: float | None = 50.0
) -> HealthRow:
    return HealthRow(
        device_id=device_id,
        ts=ts,
        cpu_percent=cpu,
        memory_percent=30.0,
        memory_rss_bytes=70 * 2**20,
        temperature_c=temperature,
        disk_free_bytes=8 * 2**30,
        uptime_s=100.0,
        agent_version="0.1.0",
    )


def _inference(
    device_id: str, ts: dt.datetime, *, count: int, p50: float, p95: float
) -> InferenceRow:
    return InferenceRow(
        device_id=device_id,
        ts=ts,
        model_name="digits",
        model_version="1.0.0",
        window_s=10.0,
        count=count,
        errors=0,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p95,
        mean_confidence=0.9,
        class_counts=[count],
        nan_outputs=0,
        drift_score=0.1,
    )
