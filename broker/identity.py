"""Who sent a request, as the broker plugin attests it with MQTT 5 user properties."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class Stamped(Protocol):
    """A received PUBLISH: paho's MQTTMessage, or the services' own Inbound."""

    @property
    def properties(self) -> object: ...


def sender_of(message: Stamped) -> Sender | None:
    """The plugin's stamp on a forwarded request, or None if it carries none."""
    for name, value in getattr(message.properties, "UserProperty", None) or ():
        if name == wire.PROPERTY_SENDER:
            parts = value.split(" ", 4)
            if len(parts) != 5:
                return None
            connection, role, certificate_id, thing, client_id = parts
            return Sender(
                client_id=client_id,
                connection=connection,
                role=role,
                certificate_id=certificate_id,
                thing=None if thing == "-" else thing,
            )
    return None
