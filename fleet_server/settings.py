"""Server configuration: flags, EDGEFLEET_* variables and embedded defaults, in one place.

Every subcommand builds its Settings the same way, so `token create` and `serve` always
meet the same database.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet_server.alerts.config import WebhookConfig, unique_labels
from protocol.mqtt import DEFAULT_PORT
from protocol.topics import DEFAULT_PREFIX


class Settings(BaseSettings):
    # Inputs stay out of error messages: a webhook URL or a database URL may hold a secret.
    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_", extra="ignore", hide_input_in_errors=True
    )

    data_dir: Path = Path("fleet-data")
    database_url: str | None = None  # default: SQLite under data_dir
    mqtt_url: str | None = None  # mqtt://host:port; None runs without the MQTT bridge
    # Server replicas set this to split the devices' messages between them (a shared
    # subscription); see Topics.server_subscriptions for what that costs on Mosquitto 2.0.
    mqtt_shared: bool = False
    broker_dir: Path | None = None  # where broker-config wrote the server's credentials
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None  # what devices use to reach the server
    topic_prefix: str = DEFAULT_PREFIX
    max_upload_bytes: int = Field(default=256 * 2**20, gt=0)
    telemetry_retention_days: float = Field(default=30.0, gt=0)
    desired_ttl_days: float = Field(default=7.0, gt=0)
    # How often the rollout controller steps each running rollout; 0 turns it off (a
    # replica that should only serve the API and ingest).
    rollout_interval_s: float = Field(default=5.0, ge=0)
    # How old the gate values that the API, the console and /metrics show may be: they are
    # judged at most this often per rollout, however many pages and scrapers ask.
    live_gates_max_age_s: float = Field(default=5.0, ge=0)

    # Webhook alerts (docs/alerts.md). EDGEFLEET_WEBHOOKS is a JSON list of
    # {"url": ..., "secret": ..., "events": [...], "name": ...}; none configured, no alerts.
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    # How often alerts are looked for and due deliveries posted; 0 turns alerts off.
    alert_interval_s: float = Field(default=10.0, ge=0)
    # A device offline (by its last will or goodbye) longer than this raises device.offline;
    # None ("off" in the environment) turns that alert off.
    alert_offline_after_s: float | None = Field(default=600.0, gt=0)
    # A model version's accuracy across the fleet, over the window, below this raises
    # model.accuracy_low, once it rests on at least alert_accuracy_min_labelled labels.
    # Off by default: what counts as low depends on the model.
    alert_min_accuracy: float | None = Field(default=None, gt=0, le=1)
    alert_accuracy_min_labelled: int = Field(default=100, gt=0)
    alert_accuracy_window_s: float = Field(default=3600.0, gt=0)
    # Each POST: the timeout of the connection and of each read, attempts before giving up,
    # and the first retry's delay, doubling up to the cap.
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)
    webhook_max_attempts: int = Field(default=8, gt=0)
    webhook_backoff_s: float = Field(default=10.0, gt=0)
    webhook_max_backoff_s: float = Field(default=3600.0, gt=0)

    @field_validator("alert_offline_after_s", "alert_min_accuracy", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        # EDGEFLEET_ALERT_OFFLINE_AFTER_S=off: an environment variable cannot say None.
        if isinstance(value, str) and value.strip().lower() in ("", "off"):
            return None
        return value

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        # Devices are handed this URL at enrolment and download artifacts from it.
        parts = urlsplit(value) if value is not None else None
        if parts is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(
                f"public_url {value!r} must be an http(s) URL, e.g. https://fleet:8080"
            )
        return value

    @field_validator("webhooks")
    @classmethod
    def _distinct_webhooks(cls, value: list[WebhookConfig]) -> list[WebhookConfig]:
        return unique_labels(value)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    def resolved_broker_dir(self) -> Path:
        return self.broker_dir or self.data_dir / "broker"

    def resolved_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def mqtt_address(self) -> tuple[str, int] | None:
        if not self.mqtt_url:
            return None
        parts = urlsplit(self.mqtt_url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"mqtt url {self.mqtt_url!r} must look like mqtt://HOST:PORT")
        return parts.hostname, parts.port or DEFAULT_PORT
