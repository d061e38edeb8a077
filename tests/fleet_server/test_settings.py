"""Server settings that devices are handed: refused at start-up, not at a device's enrolment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet_server.settings import Settings


@pytest.mark.parametrize("url", ["fleet.example:8080", "ftp://fleet.example", "https://"])
def test_a_public_url_devices_could_not_use_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match=r"public_url .* must be an http"):
        Settings(public_url=url)


@pytest.mark.parametrize("url", ["https://fleet.example:8443", "http://10.0.0.2:8080/fleet"])
def test_http_public_urls_are_taken(url: str) -> None:
    assert Settings(public_url=url).resolved_public_url() == url
