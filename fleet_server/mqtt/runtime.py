"""Start the server's MQTT side: the broker admin client and the bridge."""

from __future__ import annotations

from dataclasses import dataclass

from fleet_server.mqtt.bridge import MqttBridge
from fleet_server.mqtt.broker_admin import BrokerAdmin
from fleet_server.mqtt.broker_config import CREDENTIALS_FILE, load_server_credentials
from fleet_server.state import FleetState


@dataclass
class MqttRuntime:
    bridge: MqttBridge
    admin: BrokerAdmin

    def stop(self) -> None:
        self.bridge.stop()
        self.admin.close()


def start_mqtt(state: FleetState) -> MqttRuntime:
    address = state.settings.mqtt_address()
    assert address is not None
    host, port = address
    credentials = load_server_credentials(state.settings.resolved_broker_dir() / CREDENTIALS_FILE)
    admin = BrokerAdmin.connect(host, port, credentials)
    bridge = MqttBridge(state, host, port, credentials.username, credentials.password)
    bridge.start()
    state.broker = admin
    state.publisher = bridge
    return MqttRuntime(bridge, admin)
