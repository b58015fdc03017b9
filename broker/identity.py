"""Who sent a request, as the broker plugin attests it with MQTT 5 user properties."""

from __future__ import annotations

from dataclasses import dataclass

import paho.mqtt.client as mqtt

from agent import wire


@dataclass(frozen=True)
class Sender:
    """Who sent a request, as the broker plugin attests it."""

    client_id: str
    connection: str
    role: str
    certificate_id: str
    thing: str | None


@dataclass(frozen=True)
class Request:
    topic: str
    payload: bytes
    sender: Sender


def sender_of(message: mqtt.MQTTMessage) -> Sender | None:
    user = dict(getattr(message.properties, "UserProperty", None) or [])
    try:
        return Sender(
            client_id=user[wire.PROPERTY_CLIENT_ID],
            connection=user[wire.PROPERTY_CONNECTION],
            role=user[wire.PROPERTY_ROLE],
            certificate_id=user[wire.PROPERTY_CERTIFICATE_ID],
            thing=user.get(wire.PROPERTY_THING),
        )
    except KeyError:
        return None
