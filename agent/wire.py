"""The wire contract: AWS IoT Core MQTT topics for Fleet Provisioning and Device Shadow.

Nothing else in the project spells a topic. Builders return exact topic strings; the
``*_FILTERS`` tuples are MQTT filters used by the broker side's policy. Topic names and
field names are wire facts (see shared/reference/aws-iot-mqtt-api.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final, Literal

PayloadFormat = Literal["json", "cbor"]
PAYLOAD_FORMATS: Final[tuple[PayloadFormat, ...]] = ("json", "cbor")

ACCEPTED: Final = "accepted"
REJECTED: Final = "rejected"
DELTA: Final = "delta"
DOCUMENTS: Final = "documents"
#: Last topic levels that only the service publishes.
REPLY_SUFFIXES: Final = (ACCEPTED, REJECTED, DELTA, DOCUMENTS)

#: AWS's name rules, the one copy in Python (the plugin's C has its own, tested against these).
#: Use ``fullmatch``: ``match`` with ``$`` would let a trailing newline through.
THING_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9:_-]{1,128}")
SHADOW_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9:_-]{1,64}")
TEMPLATE_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,36}")

# --------------------------------------------------------------------------- provisioning


def create_certificate_from_csr(fmt: PayloadFormat = "json") -> str:
    return f"$aws/certificates/create-from-csr/{fmt}"


def create_keys_and_certificate(fmt: PayloadFormat = "json") -> str:
    return f"$aws/certificates/create/{fmt}"


def register_thing(template_name: str, fmt: PayloadFormat = "json") -> str:
    return f"$aws/provisioning-templates/{template_name}/provision/{fmt}"


def reply(request_topic: str, outcome: Literal["accepted", "rejected"]) -> str:
    """The accepted or rejected topic of a request topic."""
    return f"{request_topic}/{outcome}"


#: Request topics of the Fleet Provisioning API, as MQTT filters.
PROVISIONING_REQUEST_FILTERS: Final = (
    "$aws/certificates/create-from-csr/+",
    "$aws/certificates/create/+",
    "$aws/provisioning-templates/+/provision/+",
)
#: Their accepted/rejected replies, as MQTT filters.
PROVISIONING_REPLY_FILTERS: Final = tuple(f"{f}/+" for f in PROVISIONING_REQUEST_FILTERS)

# --------------------------------------------------------------------------------- shadow

ShadowOperation = Literal["get", "update", "delete"]
SHADOW_OPERATIONS: Final[tuple[ShadowOperation, ...]] = ("get", "update", "delete")


def shadow_prefix(thing_name: str, shadow_name: str | None = None) -> str:
    """``$aws/things/<thing>/shadow`` or ``.../shadow/name/<shadow>`` for a named shadow."""
    base = f"$aws/things/{thing_name}/shadow"
    # "" is a (malformed) named shadow, not the classic one: its rejection must go back to
    # the topic it was asked on.
    return base if shadow_name is None else f"{base}/name/{shadow_name}"


def shadow_topic(
    thing_name: str, operation: ShadowOperation, shadow_name: str | None = None
) -> str:
    return f"{shadow_prefix(thing_name, shadow_name)}/{operation}"


def shadow_delta(thing_name: str, shadow_name: str | None = None) -> str:
    return f"{shadow_prefix(thing_name, shadow_name)}/update/{DELTA}"


def shadow_documents(thing_name: str, shadow_name: str | None = None) -> str:
    return f"{shadow_prefix(thing_name, shadow_name)}/update/{DOCUMENTS}"


def thing_filter(thing: str) -> str:
    """Every topic of one thing (``thing`` may be a policy placeholder)."""
    return f"$aws/things/{thing}/#"


def shadow_request_filters(thing: str = "+") -> tuple[str, ...]:
    """Shadow request topics (classic and named) of ``thing`` as MQTT filters."""
    classic = tuple(f"$aws/things/{thing}/shadow/{op}" for op in SHADOW_OPERATIONS)
    named = tuple(f"$aws/things/{thing}/shadow/name/+/{op}" for op in SHADOW_OPERATIONS)
    return classic + named


# ------------------------------------------------------------------------ device health


def status_topic(thing_name: str) -> str:
    """The device's own presence topic: a retained ``{"state": "online"|"offline", ...}``,
    set online by the agent and offline by its Last Will or its clean shutdown. Outside
    ``$aws/`` so it works on AWS IoT Core too (allow it in the device's IoT policy there)."""
    return f"fleet/things/{thing_name}/status"


# ---------------------------------------------------------------- broker-side extensions

#: The user property the broker plugin stamps on a forwarded request:
#: ``"<connection> <role> <certificate id> <thing or -> <client id>"`` (client id last: it alone
#: may contain spaces).
PROPERTY_SENDER: Final = "fleet-sender"
#: User properties the services put on a reply for the plugin to route it to one connection.
PROPERTY_REPLY_TO: Final = "fleet-reply-to"
PROPERTY_CONNECTION: Final = "fleet-connection"

#: Client-id spaces the plugin enforces (docs/architecture.md, "Identities"). A thing's client id
#: is its name (THING_NAME_PATTERN); a claim's must start with CLAIM_CLIENT_ID_PREFIX, which
#: no thing name may start with, so a claim can neither take nor probe a thing's id; operator
#: tools (service identity) use OPERATOR_CLIENT_ID_PREFIX, a character no thing name has.
CLAIM_CLIENT_ID_PREFIX: Final = "claim-"
OPERATOR_CLIENT_ID_PREFIX: Final = "@"


def operator_client_id(purpose: str) -> str:
    """A fresh client id for an operator tool: unguessable, and never a thing's or a claim's."""
    import secrets

    return f"{OPERATOR_CLIENT_ID_PREFIX}fleet.{purpose}.{secrets.token_hex(6)}"


#: Plugin control topic (Mosquitto ``$CONTROL/<feature>/<version>``); service identity only.
CONTROL_TOPIC: Final = "$CONTROL/fleet/v1"
#: The plugin tells the services, stamped with the connection's identity, that a device has
#: connected with a newly registered certificate for the first time (it is in use now; the
#: certificate a renewal replaces can be retired).
FIRST_CONNECT_TOPIC: Final = "$fleet/v1/events/first-connect"
#: The services' own figures (queue depths, requests handled), JSON, once a second; for
#: operator tools with the service identity (fleet-sim shows them beside the broker's $SYS).
SERVICE_STATS_TOPIC: Final = "$fleet/v1/stats/services"


# ---------------------------------------------------------------------- parsing & codecs

ProvisioningOperation = Literal["create-from-csr", "create", "register-thing"]


def parse_provisioning_request(
    topic: str,
) -> tuple[ProvisioningOperation, str | None, PayloadFormat] | None:
    """(operation, template name or None, payload format) of a provisioning request topic."""
    parts = topic.split("/")
    if (
        len(parts) == 4
        and parts[:2] == ["$aws", "certificates"]
        and parts[2] in ("create-from-csr", "create")
        and parts[3] in PAYLOAD_FORMATS
    ):
        return parts[2], None, parts[3]  # type: ignore[return-value]
    if (
        len(parts) == 5
        and parts[:2] == ["$aws", "provisioning-templates"]
        and parts[3] == "provision"
        and parts[4] in PAYLOAD_FORMATS
    ):
        return "register-thing", parts[2], parts[4]
    return None


def encode(document: object, fmt: PayloadFormat = "json") -> bytes:
    if fmt == "cbor":
        import cbor2

        return cbor2.dumps(document)
    return json.dumps(document, separators=(",", ":")).encode()


def decode(payload: bytes, fmt: PayloadFormat = "json") -> object:
    """Raises ValueError on a payload that is not valid in its format."""
    if fmt == "cbor":
        import cbor2

        try:
            return cbor2.loads(payload)
        except Exception as exc:  # cbor2 raises several types for bad input
            raise ValueError(f"not valid CBOR: {exc}") from None
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    except RecursionError:  # json's C decoder recurses per nesting level
        raise ValueError("not valid JSON: nested too deeply") from None


def parse_shadow_request(topic: str) -> tuple[str, str | None, ShadowOperation] | None:
    """(thing, shadow name or None for the classic shadow, operation) of a shadow request."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "shadow":
        return None
    operation = parts[-1]
    if operation not in SHADOW_OPERATIONS:
        return None
    if len(parts) == 5:
        return parts[2], None, operation
    if len(parts) == 7 and parts[4] == "name":
        return parts[2], parts[5], operation
    return None


def shadow_reply(
    thing_name: str, operation: ShadowOperation, outcome: str, shadow_name: str | None = None
) -> str:
    """``<prefix>/<operation>/<accepted|rejected>``."""
    return f"{shadow_topic(thing_name, operation, shadow_name)}/{outcome}"


def state_from_assignments(assignments: Iterable[str]) -> dict[str, object]:
    """``a.b=1 c="x" d=null`` -> ``{"a": {"b": 1}, "c": "x", "d": None}``: the command-line
    notation for shadow state. Values are JSON when they parse, strings otherwise; dotted keys
    nest. Raises ValueError naming the bad assignment."""
    state: dict[str, object] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"{assignment!r} is not key=value (JSON values allowed)")
        try:
            value: object = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = state
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{key}: {part} is set to a value and used as an object")
            node = child
        node[leaf] = value
    return state
