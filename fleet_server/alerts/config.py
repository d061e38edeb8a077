"""What a webhook is, as the settings accept it."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class AlertKind(StrEnum):
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_ROLLED_BACK = "rollout.rolled_back"
    ROLLOUT_ABORTED = "rollout.aborted"
    DEVICE_OFFLINE = "device.offline"
    MODEL_ACCURACY_LOW = "model.accuracy_low"


# Kinds that are conditions: open while they hold, resolved when they clear. The others
# are events that simply happened.
CONDITION_KINDS = frozenset({AlertKind.DEVICE_OFFLINE, AlertKind.MODEL_ACCURACY_LOW})


class WebhookConfig(BaseModel):
    # The URL itself is often the credential (Slack, Teams, ...): it stays out of reprs
    # and of error messages (Settings hides its inputs too, which is what applies there).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    url: str = Field(repr=False)
    secret: SecretStr | None = None
    # Which events go to this webhook; None is every one.
    events: frozenset[AlertKind] | None = None
    # What logs and the alert_deliveries table call the webhook: never the URL, for the
    # reason above. By default the host and a digest of the whole URL.
    name: str | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            shown = f"{parts.scheme}://" if parts.scheme else "no scheme"
            raise ValueError(f"webhook url must start with http:// or https://, not {shown}")
        if not parts.hostname:
            raise ValueError("webhook url has no host")
        if any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("webhook url must not contain whitespace or control characters")
        try:
            parts.port  # noqa: B018 - raises on a port out of range or not a number
        except ValueError:
            raise ValueError("webhook url has an invalid port") from None
        return value

    @field_validator("events")
    @classmethod
    def _some_events(cls, value: frozenset[AlertKind] | None) -> frozenset[AlertKind] | None:
        if value is not None and not value:
            raise ValueError("events must name at least one event, or be left out for all")
        return value

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        host = (urlsplit(self.url).hostname or "webhook")[:48]
        return f"{host}-{hashlib.sha256(self.url.encode()).hexdigest()[:8]}"

    def wants(self, kind: str) -> bool:
        return self.events is None or kind in self.events

    def secret_bytes(self) -> bytes | None:
        return self.secret.get_secret_value().encode() if self.secret is not None else None


def unique_labels(webhooks: list[WebhookConfig]) -> list[WebhookConfig]:
    """The list as given, once no two webhooks share a name (deliveries are kept per name)."""
    seen: set[str] = set()
    for webhook in webhooks:
        if webhook.label in seen:
            raise ValueError(f"two webhooks are called {webhook.label!r}; give them distinct names")
        seen.add(webhook.label)
    return webhooks
