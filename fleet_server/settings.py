"""Server configuration: flags, EDGEFLEET_* variables and embedded defaults, in one place.

Every subcommand builds its Settings the same way, so `token create` and `serve` always
meet the same database.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.topics import DEFAULT_PREFIX


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

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
        return parts.hostname, parts.port or 1883
