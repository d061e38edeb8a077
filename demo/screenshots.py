"""Screenshots of the web console, taken in headless Chromium (Debian's `chromium`, driven
by Playwright): `make screenshots` runs the demo with `--screenshots docs/screenshots`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

VIEWPORT: ViewportSize = {"width": 1280, "height": 860}


def chromium_executable() -> str:
    """Debian's chromium (`make test` and `make screenshots` install it), or EDGEFLEET_CHROMIUM."""
    found = os.environ.get("EDGEFLEET_CHROMIUM") or shutil.which("chromium")
    if found is None:
        raise RuntimeError(
            "no chromium found: `make test` installs Debian's chromium; or set EDGEFLEET_CHROMIUM"
        )
    return found


# --no-sandbox: containers and CI run as root, where Chromium's sandbox refuses to start.
CHROMIUM_ARGS = ["--no-sandbox"]


def capture(base: str, token: str, pages: dict[str, str], out: Path) -> list[Path]:
    """Sign in with `token`, then save each page (name -> path) as out/NAME.png."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{base}/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/")
            for name, path in pages.items():
                page.goto(base + path)
                page.wait_for_load_state("networkidle")
                saved.append(out / f"{name}.png")
                page.screenshot(path=saved[-1], full_page=True)
        finally:
            browser.close()
    return saved
