"""How every side opens its MQTT connection: MQTT 5 (the server relies on shared
subscriptions and session expiry) with paho's version-2 callbacks.

Only the agent and the server import this module; the rest of `protocol` needs no paho.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

DEFAULT_PORT = 1883  # a broker URL or an enrolment answer without a port means this one


def new_client(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    manual_ack: bool = False,
    reconnect_on_failure: bool = True,
) -> mqtt.Client:
    """A paho client speaking MQTT 5, logged in as `username` when one is given.

    `manual_ack`: QoS 1 messages are acknowledged only when the caller says so (the
    server acks once a message is in its database).
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
        reconnect_on_failure=reconnect_on_failure,
    )
    if username is not None:
        client.username_pw_set(username, password)
    return client
