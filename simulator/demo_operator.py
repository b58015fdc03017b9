"""The operator side of the demo: the service identity, as an operator's tool would use it.

It changes desired state through the Device Shadow service (an ordinary update request; the
plugin stamps it as the service's) and watches every ``/update/documents`` message, which only
the thing's own device and the service identity may receive. That is how it sees, without
asking any device, when a desired change has come back as reported state. A device that
reported before the operator connected (a fleet-agent already running in another container)
is read with a shadow get. It also sends the plugin's kick command when the demo revokes a
device, as ``fleet-broker revoke`` does.

paho runs its own network thread; the asyncio side waits on futures resolved thread-safely.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from agent import wire
from broker.mqtt import ConnectError, connect, disconnect, tls_context
from broker.pki import PkiPaths

Reported = dict[str, Any]
Predicate = Callable[[Reported], bool]


@dataclass
class _Waiter:
    thing: str
    predicate: Predicate
    future: asyncio.Future[float]


class Operator:
    def __init__(self, pki: PkiPaths, host: str, port: int) -> None:
        self.pki = pki  # the service identity's certificate and key
        self.host = host
        self.port = port
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._reported: dict[str, Reported] = {}  # thing -> last reported state seen
        self._versions: dict[str, int] = {}  # thing -> shadow version of that state
        self._waiters: list[_Waiter] = []
        self._client: mqtt.Client | None = None
        self._sequence = 0

    # ------------------------------------------------------------------ connection

    def start(self) -> None:
        """Connect and subscribe to every thing's documents (blocking: run it in a thread)."""
        self._client = connect(
            self.host,
            self.port,
            context=tls_context(self.pki.ca_cert, self.pki.service_cert, self.pki.service_key),
            client_id=wire.operator_client_id("demo-operator"),
            on_message=self._on_message,
        )
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: subscribed.set()
        # `+` may stand for the thing: the first level is the explicit `$aws`.
        got = wire.reply(wire.shadow_topic("+", "get"), "accepted")
        self._client.subscribe([(wire.shadow_documents("+"), 1), (got, 1)])
        if not subscribed.wait(10):
            raise ConnectError("the broker did not acknowledge the operator's subscription")

    def close(self) -> None:
        if self._client is not None:
            disconnect(self._client)
            self._client = None

    # --------------------------------------------------------------------- desired

    def desire(self, thing: str, desired: dict[str, Any]) -> None:
        assert self._client is not None
        self._sequence += 1
        request = {"state": {"desired": desired}, "clientToken": f"demo-{self._sequence}"}
        self._client.publish(wire.shadow_topic(thing, "update"), json.dumps(request), qos=1)

    def fetch(self, thing: str) -> None:
        """Ask for ``thing``'s shadow: its reported state arrives like a document's."""
        assert self._client is not None
        self._sequence += 1
        request = {"clientToken": f"demo-{self._sequence}"}
        self._client.publish(wire.shadow_topic(thing, "get"), json.dumps(request), qos=1)

    def kick(self, certificate_ids: Iterable[str]) -> None:
        """Ask the plugin to disconnect live connections using these certificates."""
        assert self._client is not None
        payload = "\n".join(f"kick-certificate {c}" for c in certificate_ids)
        self._client.publish(wire.CONTROL_TOPIC, payload, qos=1).wait_for_publish(5)

    # ------------------------------------------------------------------- reported

    def reported(self, thing: str) -> Reported | None:
        with self._lock:
            return self._reported.get(thing)

    async def wait_reported(self, thing: str, predicate: Predicate, timeout: float) -> float:
        """Until a document shows ``thing``'s reported state meeting ``predicate``; returns the
        ``time.perf_counter()`` at which that document arrived. Raises TimeoutError."""
        future: asyncio.Future[float] = self._loop.create_future()
        with self._lock:
            seen = self._reported.get(thing)
            if seen is not None and predicate(seen):
                return time.perf_counter()
            waiter = _Waiter(thing, predicate, future)
            self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        arrived = time.perf_counter()
        thing = message.topic.split("/")[2]
        try:
            document = json.loads(message.payload)
            # /update/documents holds "current"; /get/accepted is the state itself.
            current = document.get("current", document)
            reported = current["state"].get("reported") or {}
            version = int(current["version"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        with self._lock:
            if version < self._versions.get(thing, -1):
                return  # a get's answer overtaken by a newer document
            self._versions[thing] = version
            self._reported[thing] = reported
            for waiter in list(self._waiters):
                if waiter.thing == thing and waiter.predicate(reported):
                    self._waiters.remove(waiter)
                    self._loop.call_soon_threadsafe(_resolve, waiter.future, arrived)


def _resolve(future: asyncio.Future[float], value: float) -> None:
    if not future.done():
        future.set_result(value)
