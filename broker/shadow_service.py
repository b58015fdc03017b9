"""Device Shadow service: broker/shadow.py's pure rules, with storage and replies.

Requests arrive from the broker plugin stamped with the sender's identity; a device may only
touch its own thing's shadows (the plugin's policy already ensures that; this is the second
lock). Replies are ordinary publishes on the AWS reply topics, which the policy lets only that
thing's device (and the service identity) receive.

Requests are handled in batches, in arrival order, in one storage transaction (a read sees the
batch's earlier writes, so one thing's updates apply in order); the replies are published only
once that transaction committed, so no ``accepted`` ever announces a write that is not stored.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent import wire
from broker.identity import Sender
from broker.registry import Registry, ShadowStore
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
Replies = list[tuple[str, bytes]]


@dataclass(frozen=True)
class ShadowRequest:
    thing: str
    shadow: str | None
    operation: wire.ShadowOperation


# One encoder, built once (json.dumps with separators= builds a new one per call).
_encode_text = json.JSONEncoder(separators=(",", ":")).encode


def _encode(document: object) -> bytes:
    return _encode_text(document).encode()


class ShadowService:
    def __init__(
        self,
        registry: Registry,
        limits: ShadowLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.limits = limits or ShadowLimits()
        self.clock = clock

    def handle(self, topic: str, payload: bytes, sender: Sender, publish: Publish) -> None:
        self.handle_batch([(topic, payload, sender)], publish)

    def handle_batch(self, requests: Sequence[tuple[str, bytes, Sender]], publish: Publish) -> None:
        """Handle ``requests`` (topic, payload, sender) in order; publish the replies once
        their writes are committed. A storage failure fails the batch, which is then retried
        request by request, so one bad write cannot cost the others their answers."""
        now = int(self.clock())
        # The broker disconnects a revoked certificate; requests it forwarded before that, or
        # while the disconnect was lost, are refused here. One lookup per batch.
        refused = self.registry.not_active({sender.certificate_id for _, _, sender in requests})
        try:
            replies = self._transaction(requests, now, refused)
        except sqlite3.Error:
            log.exception("a shadow batch of %d failed; retrying one by one", len(requests))
            replies = []
            for request in requests:
                try:
                    replies += self._transaction([request], now, refused)
                except sqlite3.Error:
                    log.exception("shadow request on %s failed", request[0])
                    replies += self._internal_error(request[0], now)
        for topic, payload in replies:
            publish(topic, payload)

    def _transaction(
        self,
        requests: Sequence[tuple[str, bytes, Sender]],
        now: int,
        refused: frozenset[str] | set[str] = frozenset(),
    ) -> Replies:
        replies: Replies = []
        with self.registry.shadow_transaction() as store:
            for topic, payload, sender in requests:
                denied = sender.certificate_id in refused
                self._one(store, topic, payload, sender, now, replies, denied)
        return replies

    def _one(
        self,
        store: ShadowStore,
        topic: str,
        payload: bytes,
        sender: Sender,
        now: int,
        replies: Replies,
        refused: bool = False,
    ) -> None:
        parsed = wire.parse_shadow_request(topic)
        if parsed is None:
            return
        request = ShadowRequest(*parsed)
        try:
            if refused:
                raise ShadowError(403, "Forbidden")
            self._authorise(request, sender)
            if request.operation == "update":
                self._update(store, request, payload, now, replies)
            elif request.operation == "get":
                self._get(store, request, payload, now, replies)
            else:
                self._delete(store, request, payload, now, replies)
        except ShadowError as error:
            reply = wire.shadow_reply(request.thing, request.operation, "rejected", request.shadow)
            replies.append((reply, _encode(error.rejected(error.client_token, now))))
        except sqlite3.Error:
            raise  # fails the transaction: handle_batch retries
        except Exception:  # a bug of ours must still get the device an answer
            log.exception("shadow %s of %s failed", request.operation, request.thing)
            replies += self._internal_error(topic, now)

    @staticmethod
    def _internal_error(topic: str, now: int) -> Replies:
        parsed = wire.parse_shadow_request(topic)
        if parsed is None:
            return []
        thing, shadow, operation = parsed
        error = ShadowError(500, "Internal service failure")
        reply = wire.shadow_reply(thing, operation, "rejected", shadow)
        return [(reply, _encode(error.rejected(None, now)))]

    @staticmethod
    def _authorise(request: ShadowRequest, sender: Sender) -> None:
        validate_thing_name(request.thing)
        if request.shadow is not None:
            validate_shadow_name(request.shadow)
        if sender.role == "service":
            return
        if sender.role != "device" or sender.thing != request.thing:
            raise ShadowError(403, "Forbidden")

    @staticmethod
    def _load(
        store: ShadowStore, request: ShadowRequest, now: int
    ) -> tuple[ShadowDocument | None, int]:
        """The live document, or None and the version a new shadow continues from."""
        stored = store.load(request.thing, request.shadow or "")
        if stored is None:
            return None, 0
        if stored.document is None:  # tombstone
            expired = stored.deleted_at is None or now - stored.deleted_at > TOMBSTONE_SECONDS
            return None, 0 if expired else stored.version
        return ShadowDocument.from_json(stored.document), stored.version

    def _update(
        self,
        store: ShadowStore,
        request: ShadowRequest,
        payload: bytes,
        now: int,
        replies: Replies,
    ) -> None:
        current, deleted_version = self._load(store, request, now)
        result = apply_update(
            current, payload, now=now, limits=self.limits, deleted_version=deleted_version
        )
        thing, shadow = request.thing, request.shadow
        # Everything that can fail comes before the write: a stored update always gets its replies.
        accepted = wire.shadow_reply(thing, "update", "accepted", shadow), _encode(result.accepted)
        delta = None
        if result.delta is not None:
            delta = (wire.shadow_delta(thing, shadow), _encode(result.delta))
        documents = (wire.shadow_documents(thing, shadow), _encode(result.documents))
        store.save(thing, shadow or "", result.document.to_json(), result.document.version)
        replies.append(accepted)
        if delta is not None:
            replies.append(delta)
        replies.append(documents)

    def _existing(
        self, store: ShadowStore, request: ShadowRequest, payload: bytes, now: int
    ) -> tuple[ShadowDocument, str | None]:
        """The live document and the request's clientToken; 404 when there is none."""
        _, token = parse_request(payload, self.limits)
        current, _ = self._load(store, request, now)
        if current is None:
            name = request.shadow or request.thing
            raise ShadowError(404, f"No shadow exists with name: '{name}'", token)
        return current, token

    def _get(
        self,
        store: ShadowStore,
        request: ShadowRequest,
        payload: bytes,
        now: int,
        replies: Replies,
    ) -> None:
        current, token = self._existing(store, request, payload, now)
        document = get_document(current, now=now, client_token=token)
        topic = wire.shadow_reply(request.thing, "get", "accepted", request.shadow)
        replies.append((topic, _encode(document)))

    def _delete(
        self,
        store: ShadowStore,
        request: ShadowRequest,
        payload: bytes,
        now: int,
        replies: Replies,
    ) -> None:
        current, token = self._existing(store, request, payload, now)
        answer = _encode(delete_result(current, now=now, client_token=token))
        store.delete(request.thing, request.shadow or "", current.version)
        topic = wire.shadow_reply(request.thing, "delete", "accepted", request.shadow)
        replies.append((topic, answer))
