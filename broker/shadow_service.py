"""Device Shadow service: broker/shadow.py's pure rules, with storage and replies.

Requests arrive from the broker plugin stamped with the sender's identity; a device may only
touch its own thing's shadows (the plugin's policy already ensures that; this is the second
lock). Replies are ordinary publishes on the AWS reply topics, which the policy lets only that
thing's device (and the service identity) receive.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent import wire
from broker.identity import Sender
from broker.registry import SQLiteRegistry
from broker.shadow import (
    ShadowDocument,
    ShadowError,
    ShadowLimits,
    apply_update,
    delete_result,
    get_document,
    parse_request,
    validate_shadow_name,
    validate_thing_name,
)

log = logging.getLogger("fleet.shadow")

TOMBSTONE_SECONDS = 48 * 3600  # AWS: a shadow recreated within 48 h continues its version

Publish = Callable[[str, bytes], None]


@dataclass(frozen=True)
class ShadowRequest:
    thing: str
    shadow: str | None
    operation: wire.ShadowOperation


def _encode(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class ShadowService:
    def __init__(
        self,
        registry: SQLiteRegistry,
        limits: ShadowLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.limits = limits or ShadowLimits()
        self.clock = clock

    def handle(self, topic: str, payload: bytes, sender: Sender, publish: Publish) -> None:
        parsed = wire.parse_shadow_request(topic)
        if parsed is None:
            return
        request = ShadowRequest(*parsed)
        now = int(self.clock())
        try:
            self._authorise(request, sender)
            if request.operation == "update":
                self._update(request, payload, now, publish)
            elif request.operation == "get":
                self._get(request, payload, now, publish)
            else:
                self._delete(request, payload, now, publish)
        except ShadowError as error:
            reply = wire.shadow_reply(request.thing, request.operation, "rejected", request.shadow)
            publish(reply, _encode(error.rejected(error.client_token, now)))
        except Exception:  # a bug of ours must still get the device an answer
            log.exception("shadow %s of %s failed", request.operation, request.thing)
            error = ShadowError(500, "Internal service failure")
            reply = wire.shadow_reply(request.thing, request.operation, "rejected", request.shadow)
            publish(reply, _encode(error.rejected(None, now)))

    @staticmethod
    def _authorise(request: ShadowRequest, sender: Sender) -> None:
        validate_thing_name(request.thing)
        if request.shadow is not None:
            validate_shadow_name(request.shadow)
        if sender.role == "service":
            return
        if sender.role != "device" or sender.thing != request.thing:
            raise ShadowError(403, "Forbidden")

    def _load(self, request: ShadowRequest, now: int) -> tuple[ShadowDocument | None, int]:
        """The live document, or None and the version a new shadow continues from."""
        stored = self.registry.load_shadow(request.thing, request.shadow or "")
        if stored is None:
            return None, 0
        if stored.document is None:  # tombstone
            expired = stored.deleted_at is None or now - stored.deleted_at > TOMBSTONE_SECONDS
            return None, 0 if expired else stored.version
        return ShadowDocument.from_json(stored.document), stored.version

    def _update(self, request: ShadowRequest, payload: bytes, now: int, publish: Publish) -> None:
        current, deleted_version = self._load(request, now)
        result = apply_update(
            current, payload, now=now, limits=self.limits, deleted_version=deleted_version
        )
        self.registry.save_shadow(
            request.thing, request.shadow or "", result.document.to_json(), result.document.version
        )
        thing, shadow = request.thing, request.shadow
        publish(wire.shadow_reply(thing, "update", "accepted", shadow), _encode(result.accepted))
        if result.delta is not None:
            publish(wire.shadow_delta(thing, shadow), _encode(result.delta))
        publish(wire.shadow_documents(thing, shadow), _encode(result.documents))

    def _existing(
        self, request: ShadowRequest, payload: bytes, now: int
    ) -> tuple[ShadowDocument, str | None]:
        """The live document and the request's clientToken; 404 when there is none."""
        _, token = parse_request(payload, self.limits)
        current, _ = self._load(request, now)
        if current is None:
            name = request.shadow or request.thing
            raise ShadowError(404, f"No shadow exists with name: '{name}'", token)
        return current, token

    def _get(self, request: ShadowRequest, payload: bytes, now: int, publish: Publish) -> None:
        current, token = self._existing(request, payload, now)
        document = get_document(current, now=now, client_token=token)
        topic = wire.shadow_reply(request.thing, "get", "accepted", request.shadow)
        publish(topic, _encode(document))

    def _delete(self, request: ShadowRequest, payload: bytes, now: int, publish: Publish) -> None:
        current, token = self._existing(request, payload, now)
        self.registry.delete_shadow(request.thing, request.shadow or "", current.version)
        answer = delete_result(current, now=now, client_token=token)
        topic = wire.shadow_reply(request.thing, "delete", "accepted", request.shadow)
        publish(topic, _encode(answer))
