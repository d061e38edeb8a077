"""The web console in real headless Chromium (Debian's `chromium`, driven by Playwright),
against `fleet-server serve` with a real fleet: Mosquitto, two `edge-agent run` processes on
digits bundles under simulated traffic with feedback, and a rollout under way.

Every page must load with no console error, no failed request and no error status; each is
saved as a screenshot under tests-output/console/ (EDGEFLEET_TEST_OUTPUT moves it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from demo.loadgen import LoadGenerator
from demo.screenshots import CHROMIUM_ARGS, VIEWPORT, chromium_executable
from tests.bundles import DigitsBundles
from tests.fleet import AgentProcess, Fleet, eventually, lab_serving, running_fleet

pytestmark = pytest.mark.slow

OUTPUT = Path(os.environ.get("EDGEFLEET_TEST_OUTPUT", "tests-output")) / "console"


@dataclass
class ConsoleFleet:
    fleet: Fleet
    agents: dict[str, AgentProcess]
    rollout_id: int
    operator: str
    viewer: str

    def rollout(self) -> dict[str, Any]:
        response = httpx.get(
            f"{self.fleet.base}/api/v1/rollouts/{self.rollout_id}", headers=self.fleet.admin
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer


@pytest.fixture(scope="module")
def console_fleet(
    tmp_path_factory: pytest.TempPathFactory, mosquitto_executable: str, digits: DigitsBundles
) -> Iterator[ConsoleFleet]:
    root = tmp_path_factory.mktemp("console")
    data = np.load(digits.eval_npz)
    with running_fleet(root, mosquitto_executable) as fleet:
        for bundle in (digits.v1, digits.v2):
            fleet.upload(bundle.folder, bundle.public_key)
        agents = lab_serving(fleet, root, digits.v1.public_key, 2, "digits", "1.0.0")
        load = LoadGenerator([a.api_port for a in agents.values()], data["x"], data["y"])
        load.start()
        try:
            eventually(
                lambda: (
                    fleet.sql("SELECT COALESCE(SUM(labelled), 0) FROM accuracy_windows")[0][0] >= 40
                )
            )
            # A first wave that bakes for an hour keeps the rollout running for the tests.
            created = httpx.post(
                f"{fleet.base}/api/v1/rollouts",
                json={
                    "model": "digits",
                    "version": "2.0.0",
                    "target": {"tags": ["lab"]},
                    "waves": [{"count": 1, "bake_s": 3600}, {"percent": 100}],
                    "gates": {
                        "max_install_failure_ratio": 0.0,
                        "max_error_rate": 0.01,
                        "max_accuracy_drop": 0.05,
                        "min_devices": 1,
                        "min_predictions": 10,
                        "min_labelled": 10,
                    },
                },
                headers=fleet.admin,
            )
            assert created.status_code == 201, created.text
            console = ConsoleFleet(
                fleet,
                agents,
                created.json()["id"],
                operator=fleet.cli("token", "create", "--role", "operator", "--name", "olivia"),
                viewer=fleet.cli("token", "create", "--role", "viewer", "--name", "victor"),
            )
            eventually(lambda: console.rollout()["phase"] == "active")
            yield console
        finally:
            load.stop()
            for agent in agents.values():
                agent.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        yield _launch(playwright)


def _launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(
        executable_path=chromium_executable(), headless=True, args=CHROMIUM_ARGS
    )


@dataclass
class Watched:
    """A page whose console errors, failed requests and error answers are all recorded."""

    page: Page
    problems: list[str] = field(default_factory=list)

    def goto(self, url: str) -> None:
        response = self.page.goto(url)
        assert response is not None, url
        assert response.ok, f"{url}: {response.status}"
        self.page.wait_for_load_state("networkidle")

    def check(self) -> None:
        assert self.problems == []


def watched(browser: Browser) -> Watched:
    page = browser.new_page(viewport=VIEWPORT)
    seen = Watched(page)

    def console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            seen.problems.append(f"console {message.type}: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda error: seen.problems.append(f"page error: {error}"))
    page.on(
        "requestfailed",
        lambda request: seen.problems.append(f"failed: {request.url} {request.failure}"),
    )
    page.on(
        "response",
        lambda response: (
            seen.problems.append(f"{response.status}: {response.url}")
            if response.status >= 400
            else None
        ),
    )
    return seen


def sign_in(seen: Watched, base: str, token: str) -> None:
    seen.goto(f"{base}/login")
    seen.page.fill("#token", token)
    seen.page.click("button[type=submit]")
    seen.page.wait_for_url(f"{base}/")


def rollout_page(browser: Browser, console_fleet: ConsoleFleet, token: str) -> Watched:
    """The running rollout's page, as the holder of `token` sees it."""
    base = console_fleet.fleet.base
    seen = watched(browser)
    sign_in(seen, base, token)
    seen.goto(f"{base}/rollouts/{console_fleet.rollout_id}")
    return seen


def test_every_page_loads_cleanly_and_is_saved(
    console_fleet: ConsoleFleet, browser: Browser
) -> None:
    base = console_fleet.fleet.base
    device_id = next(iter(console_fleet.agents))
    OUTPUT.mkdir(parents=True, exist_ok=True)
    seen = watched(browser)
    seen.goto(f"{base}/")
    assert seen.page.url == f"{base}/login", "a visitor without a session is asked to sign in"
    seen.page.screenshot(path=OUTPUT / "login.png")
    sign_in(seen, base, console_fleet.operator)
    pages = {
        "overview": "/",
        "devices": "/devices",
        "device": f"/devices/{device_id}",
        "models": "/models",
        "rollouts": "/rollouts",
        "rollout": f"/rollouts/{console_fleet.rollout_id}",
    }
    for name, path in pages.items():
        seen.goto(base + path)
        seen.page.screenshot(path=OUTPUT / f"{name}.png", full_page=True)
    seen.check()

    # What the pages say is the fleet's, not placeholders.
    seen.goto(f"{base}/")
    assert seen.page.locator(".tile strong").first.inner_text() == "2"  # online
    seen.goto(f"{base}/devices?tag=lab")
    assert seen.page.locator("table.devices tbody tr").count() == 2
    seen.goto(f"{base}/devices/{device_id}")
    assert seen.page.locator("svg.chart polyline, svg.chart circle").count() > 0
    seen.goto(f"{base}/models")
    assert seen.page.locator("table.models tbody tr").count() == 2
    seen.goto(f"{base}/rollouts/{console_fleet.rollout_id}")
    assert seen.page.locator("table.gates tbody tr").count() > 0
    seen.check()
    seen.page.close()


def test_an_operator_pauses_and_resumes_a_running_rollout(
    console_fleet: ConsoleFleet, browser: Browser
) -> None:
    seen = rollout_page(browser, console_fleet, console_fleet.operator)
    assert console_fleet.rollout()["state"] == "running"

    seen.page.click("button[value=pause]")
    seen.page.wait_for_selector("#rollout-state:text('paused')")
    assert console_fleet.rollout()["state"] == "paused"

    seen.page.click("button[value=resume]")
    seen.page.wait_for_selector("#rollout-state:text('running')")
    assert console_fleet.rollout()["state"] == "running"
    seen.check()
    seen.page.close()


def test_the_page_follows_a_change_made_elsewhere(
    console_fleet: ConsoleFleet, browser: Browser
) -> None:
    seen = rollout_page(browser, console_fleet, console_fleet.viewer)
    assert seen.page.inner_text("#rollout-state") == "running"
    headers = {"Authorization": f"Bearer {console_fleet.operator}"}
    url = f"{console_fleet.fleet.base}/api/v1/rollouts/{console_fleet.rollout_id}"
    try:
        assert httpx.post(f"{url}/pause", headers=headers).status_code == 200
        # No reload: the live region polls the server.
        seen.page.wait_for_selector("#rollout-state:text('paused')", timeout=15_000)
    finally:
        assert httpx.post(f"{url}/resume", headers=headers).status_code == 200
    seen.check()
    seen.page.close()


def test_a_viewer_sees_no_actions_and_the_server_refuses_them(
    console_fleet: ConsoleFleet, browser: Browser
) -> None:
    base = console_fleet.fleet.base
    seen = rollout_page(browser, console_fleet, console_fleet.viewer)
    assert seen.page.locator("form.actions button").count() == 0
    seen.check()

    # Forced: the viewer's own session posts the form the page did not offer.
    csrf = seen.page.locator("form.who input[name=csrf]").get_attribute("value")
    answer = seen.page.request.post(
        f"{base}/rollouts/{console_fleet.rollout_id}/act",
        form={"action": "pause", "csrf": csrf or ""},
        max_redirects=0,
    )
    assert answer.status == 403
    assert "operator" in answer.text()
    assert console_fleet.rollout()["state"] == "running"
    seen.page.close()
