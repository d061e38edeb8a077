"""The server's MQTT side: the broker admin client and the bridge, built with the state
and connected by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from fleet_server.metrics.server import ServerMetrics
from fleet_server.mqtt.bridge import MqttBridge
from fleet_server.mqtt.broker_admin import BrokerAdmin
from fleet_server.mqtt.broker_config import CREDENTIALS_FILE, load_server_credentials
from fleet_server.settings import Settings
from protocol.topics import Topics


@dataclass(frozen=True)
class MqttRuntime:
    bridge: MqttBridge
    admin: BrokerAdmin

    def start(self) -> None:
        """Log in as the server (refused: an error now, not a server that runs deaf), then
        let the bridge connect and keep reconnecting on its own."""
        self.admin.open()
        self.bridge.start()

    def stop(self) -> None:
        self.bridge.stop()
        self.admin.close()


def build_mqtt(
    settings: Settings,
    sessions: sessionmaker[Session],
    topics: Topics,
    metrics: ServerMetrics,
) -> MqttRuntime | None:
    """The MQTT side for `settings.mqtt_url`, not connected yet; None without one. Reads
    the server's broker credentials, so a missing `broker-config` is an error here."""
    address = settings.mqtt_address()
    if address is None:
        return None
    host, port = address
    credentials = load_server_credentials(settings.resolved_broker_dir() / CREDENTIALS_FILE)
    bridge = MqttBridge(settings, sessions, topics, metrics, host, port, credentials)
    return MqttRuntime(bridge, BrokerAdmin(host, port, credentials))
