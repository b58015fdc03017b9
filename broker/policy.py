"""Least-privilege policy per identity, rendered for the broker plugin.

The plugin (broker/plugin/fleet_plugin.c) allows nothing that is not listed here. Each rule
names a role, an access kind and an MQTT filter; ``%t`` stands for the connection's own
thing name. ``forward`` lines name the request topics that the plugin hands to the fleet
services, stamped with the sender's identity, instead of broadcasting them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from agent import wire

Role = Literal["device", "claim", "service"]
Access = Literal["publish", "subscribe", "receive"]

ACCESS_KINDS: tuple[Access, ...] = ("publish", "subscribe", "receive")

THING = "%t"


@dataclass(frozen=True)
class Rule:
    role: Role
    access: Access
    filter: str


def _provisioning_requests(*, with_server_made_keys: bool) -> list[str]:
    topics = []
    for fmt in wire.PAYLOAD_FORMATS:
        topics += [wire.create_certificate_from_csr(fmt), wire.register_thing("+", fmt)]
        if with_server_made_keys:
            topics.append(wire.create_keys_and_certificate(fmt))
    return topics


def rules() -> Iterator[Rule]:
    # Devices: requests on their own thing's topics, and the provisioning API for renewal.
    for topic in wire.shadow_request_filters(THING):
        yield Rule("device", "publish", topic)
    # A device renews with its own CSR; keys made by the service never suit it.
    for topic in _provisioning_requests(with_server_made_keys=False):
        yield Rule("device", "publish", topic)
    yield Rule("device", "publish", wire.status_topic(THING))  # presence, retained; its Will
    yield Rule("device", "subscribe", wire.thing_filter(THING))
    yield Rule("device", "receive", wire.thing_filter(THING))
    for topic in wire.PROVISIONING_REPLY_FILTERS:
        yield Rule("device", "subscribe", topic)

    # Claim (bootstrap) identities: only the provisioning requests. They may subscribe to
    # the reply topics, but replies reach them only through directed delivery, never as
    # broadcasts, so no claim client ever sees another device's reply.
    for topic in _provisioning_requests(with_server_made_keys=True):
        yield Rule("claim", "publish", topic)
    for topic in wire.PROVISIONING_REPLY_FILTERS:
        yield Rule("claim", "subscribe", topic)

    # The fleet services and operator tools.
    for access in ACCESS_KINDS:
        yield Rule("service", access, "$aws/#")
        yield Rule("service", access, "#")
    yield Rule("service", "subscribe", "$SYS/#")
    yield Rule("service", "receive", "$SYS/#")
    yield Rule("service", "publish", wire.CONTROL_TOPIC)
    yield Rule("service", "receive", wire.FIRST_CONNECT_TOPIC)
    for access in ACCESS_KINDS:
        yield Rule("service", access, wire.SERVICE_STATS_TOPIC)


def request_filters() -> tuple[str, ...]:
    return wire.PROVISIONING_REQUEST_FILTERS + wire.shadow_request_filters("+")


def render() -> str:
    lines = [
        "# mqtt-fleet broker policy, rendered by fleet-broker from agent/wire.py.",
        "# Read by the fleet plugin at start and on SIGHUP; anything not allowed is denied.",
    ]
    lines += [f"forward {topic}" for topic in request_filters()]
    lines += [f"allow {r.role} {r.access} {r.filter}" for r in rules()]
    return "\n".join(lines) + "\n"
