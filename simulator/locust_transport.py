"""A synchronous MQTT 5 connection over mutual TLS for Locust users, on paho-mqtt and gevent.

Locust runs each user in a greenlet with the standard library patched by gevent, so the blocking
TCP connect and TLS handshake here yield to the other users. Once connected, one greenlet per
connection waits for its socket to become readable and drives paho's external-loop API
(``loop_read`` / ``loop_write`` / ``loop_misc``). That is all a connection costs: paho's
``loop_start()`` would add a socketpair (two more descriptors) and a ``select()`` every second
per client. Writes are made by the calling greenlet: paho writes at once outside its callbacks.

`Connection.request` publishes and waits for the first reply on given topics that a predicate
accepts (the Device Shadow API echoes ``clientToken``, so several shadow requests can be in flight
on one connection; provisioning replies carry no correlation and go one at a time).

Failures raise agent.session's errors, whose messages name the stage: `BrokerUnreachable` (TCP),
`TlsFailure`, `ConnectRefused` (CONNACK), `SessionTimeout`, `ConnectionLost`,
`SubscribeRefused`, `PublishRefused`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

# gevent ships no type hints (and typeshed has no stubs for it): its names are Any here.
import gevent  # type: ignore[import-untyped]
import paho.mqtt.client as mqtt
from gevent.event import AsyncResult  # type: ignore[import-untyped]
from gevent.socket import wait, wait_write  # type: ignore[import-untyped]
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.session import (
    BrokerUnreachable,
    ConnectionLost,
    ConnectRefused,
    PahoOnSocket,
    PublishRefused,
    SessionError,
    SessionTimeout,
    SubscribeRefused,
    TlsFailure,
    TlsSource,
    closed_before_connack,
    describe_error,
    handshake_failure,
)

log = logging.getLogger("fleet.locust.transport")

__all__ = [
    "BrokerUnreachable",
    "ConnectRefused",
    "Connection",
    "ConnectionLost",
    "Message",
    "PublishRefused",
    "SessionError",
    "SessionTimeout",
    "SubscribeRefused",
    "TlsFailure",
]


class Message:
    """One received PUBLISH; ``document`` is its JSON payload, decoded once (None if not JSON)."""

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload

    @cached_property
    def document(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError:
            return None

    def field(self, name: str) -> object:
        document = self.document
        return document.get(name) if isinstance(document, dict) else None


Match = Callable[[Message], bool]


@dataclass(eq=False)
class _Waiter:
    match: Match | None
    result: AsyncResult = field(default_factory=AsyncResult)


def _open_tls(host: str, port: int, context: TlsSource, deadline: float) -> ssl.SSLSocket:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    timeout = deadline - time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise SessionTimeout(f"no TCP connection to {where} within {timeout:.3g} s") from None
    except OSError as exc:
        raise BrokerUnreachable(
            f"cannot reach the broker at {where}: {describe_error(exc)}"
        ) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A shared context gets this device's pair loaded here: nothing yields to another
        # greenlet between that and the TLS object's creation (simulator/shared_tls.py).
        ready = context() if callable(context) else context
        tls = ready.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        tls.settimeout(max(0.001, deadline - time.monotonic()))
        tls.do_handshake()
    except (ssl.SSLError, OSError) as exc:  # TimeoutError included
        sock.close()
        raise handshake_failure(exc, where, timeout) from None
    except BaseException:
        sock.close()
        raise
    return tls


class Connection:
    """One MQTT 5 connection (clean start, no session kept). Make one with `open`."""

    def __init__(self, client_id: str, host: str, port: int, keepalive: int) -> None:
        self.client_id = client_id
        self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._host, self._port, self._keepalive = host, port, keepalive
        self._connack = AsyncResult()
        self._acks: dict[int, AsyncResult] = {}
        self._waiters: dict[str, list[_Waiter]] = {}
        self._routes: dict[str, Callable[[Message], None]] = {}
        self._reader: gevent.Greenlet | None = None
        self._last_error: str | None = None
        self.closed_reason: str | None = None
        client = PahoOnSocket(client_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_ack
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_log
        self._client = client

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        context: TlsSource,
        timeout: float,
        keepalive: int = 120,
    ) -> Connection:
        """TCP connect, TLS handshake (broker certificate and host name verified), CONNECT,
        CONNACK: returns once the broker accepted the connection, within ``timeout``."""
        deadline = time.monotonic() + timeout
        connection = cls(client_id, host, port, keepalive)
        tls = _open_tls(host, port, context, deadline)
        connection._start(tls, deadline)
        return connection

    def _start(self, tls: ssl.SSLSocket, deadline: float) -> None:
        # paho's Properties has no annotations; --strict calls that an untyped call.
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        self._client.prepared = tls
        try:
            rc = self._client.connect(
                self._host, self._port, self._keepalive, clean_start=True, properties=properties
            )
        except OSError as exc:
            tls.close()
            raise ConnectionLost(
                f"cannot start MQTT on {self.where}: {describe_error(exc)}"
            ) from None
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self.abort()
            raise ConnectionLost(f"cannot send CONNECT to {self.where}: {mqtt.error_string(rc)}")
        self._reader = gevent.spawn(self._pump)
        try:
            reason: ReasonCode = self._connack.get(timeout=max(0.0, deadline - time.monotonic()))
        except gevent.Timeout:
            self.abort()
            raise SessionTimeout(f"no CONNACK from {self.where} in time") from None
        except SessionError:
            self.abort()
            raise
        finally:
            self._client.on_log = None
        if reason.is_failure:
            self.abort()
            raise ConnectRefused(
                f"{self.where} refused the connection: {reason.getName()} (0x{reason.value:02X})",
                reason.value,
                reason.getName(),
            )

    # ------------------------------------------------------------------------- public

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def route(self, topic: str, handler: Callable[[Message], None]) -> None:
        """Hand every message on exactly ``topic`` to ``handler`` (before any request that waits
        for it sees it). It runs on the connection's reader greenlet and must not block."""
        self._routes[topic] = handler

    def subscribe(self, *topic_filters: str, timeout: float, qos: int = 1) -> None:
        """One SUBSCRIBE; raise SubscribeRefused if the SUBACK refuses any filter."""
        self._check_open()
        rc, mid = self._client.subscribe([(f, SubscribeOptions(qos=qos)) for f in topic_filters])
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionLost(f"cannot subscribe on {self.where}: {mqtt.error_string(rc)}")
        ack = self._acks[mid] = AsyncResult()
        try:
            self._flush(timeout)
            codes: list[ReasonCode] = ack.get(timeout=timeout)
        except gevent.Timeout:
            raise SessionTimeout(f"no SUBACK from {self.where} within {timeout:g} s") from None
        finally:
            self._acks.pop(mid, None)
        for topic_filter, code in zip(topic_filters, codes, strict=False):
            if code.is_failure:
                raise SubscribeRefused(
                    f"the broker refused the subscription to {topic_filter}: "
                    f"{code.getName()} (0x{code.value:02X})",
                    topic_filter,
                    code.value,
                )

    def request(
        self,
        topic: str,
        payload: bytes,
        replies: Iterable[str],
        *,
        timeout: float,
        match: Match | None = None,
    ) -> Message:
        """Publish (QoS 1) and return the first message on one of ``replies`` that ``match``
        accepts (any, without it). Subscribe to ``replies`` first."""
        self._check_open()
        waiter = _Waiter(match)
        topics = tuple(replies)
        for reply in topics:
            self._waiters.setdefault(reply, []).append(waiter)
        mid: int | None = None
        try:
            info = self._client.publish(topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionLost(
                    f"cannot publish on {self.where}: {mqtt.error_string(info.rc)}"
                )
            mid = info.mid
            self._acks[mid] = waiter.result  # a failed PUBACK fails the request
            self._flush(timeout)
            answer: Message = waiter.result.get(timeout=timeout)  # gevent is untyped
            return answer
        except gevent.Timeout:
            # No topic in the text: it names the thing, and Locust groups failures by text.
            raise SessionTimeout(f"no reply from {self.where} within {timeout:g} s") from None
        finally:
            if mid is not None:
                self._acks.pop(mid, None)
            for reply in topics:
                waiting = self._waiters.get(reply)
                if waiting is not None and waiter in waiting:
                    waiting.remove(waiter)
                    if not waiting:
                        del self._waiters[reply]

    def close(self) -> None:
        """DISCONNECT (normal) and close; idempotent."""
        if self.closed:
            return
        self._stop_reader()
        if self._client.socket() is not None:
            self.closed_reason = "closed by us"
            self._client.disconnect()  # paho writes it at once, then closes the socket
        self.abort()

    def abort(self) -> None:
        """Close the socket at once, without DISCONNECT."""
        self._stop_reader()
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._finish(self.closed_reason or "aborted")

    # ---------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionLost(f"the connection to {self.where} is closed ({self.closed_reason})")

    def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=True)

    def _flush(self, timeout: float) -> None:
        """Finish writing what paho could not write at once (a full socket buffer)."""
        while self._client.want_write():
            sock = self._client.socket()
            if sock is None:
                raise ConnectionLost(f"the connection to {self.where} closed while writing")
            try:
                wait_write(sock.fileno(), timeout=timeout)
            except TimeoutError:
                raise SessionTimeout(f"{self.where} took no data for {timeout:g} s") from None
            self._client.loop_write()

    def _pump(self) -> None:
        """The reader greenlet: read whenever the socket is readable; keepalive in between."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return
        watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
        tick = max(1.0, self._keepalive / 4)
        try:
            while True:
                wait(watcher, timeout=tick, timeout_exc=False)  # False: just return on timeout
                rc = client.loop_read()
                # Decrypted bytes can wait inside the TLS layer with the socket drained.
                # paho types its socket as SocketLike; ours is the SSLSocket _open_tls made.
                while rc == mqtt.MQTT_ERR_SUCCESS and (s := client.socket()) is not None:
                    if not cast(ssl.SSLSocket, s).pending():
                        break
                    rc = client.loop_read()
                if rc == mqtt.MQTT_ERR_SUCCESS and client.want_write():
                    rc = client.loop_write()
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    rc = client.loop_misc()
                if rc != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
                    break
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # a bug: say so, and end this connection only
            log.exception("connection %s: reader failed", self.client_id)
            self.closed_reason = f"reader failed: {exc}"
        finally:
            watcher.close()
        if self._reader is gevent.getcurrent():
            self._reader = None
            self.abort()

    def _finish(self, why: str) -> None:
        """The connection is over: fail whatever still waits on it."""
        if self.closed_reason is None:
            self.closed_reason = why
        if not self._connack.ready():
            error = closed_before_connack(self.where, self._last_error or why, why)
            self._connack.set_exception(error)
        lost = ConnectionLost(f"the connection to {self.where} closed ({self.closed_reason})")
        pending = [*self._acks.values(), *(w.result for ws in self._waiters.values() for w in ws)]
        for result in pending:
            if not result.ready():
                result.set_exception(lost)

    # ------------------------------------------------- paho callbacks (reader greenlet)

    def _on_log(self, _c: mqtt.Client, _u: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:  # until CONNACK: keeps the TLS alert that refused us
            # 'failed to receive on socket: [SSL: X] sslv3 alert ... (_ssl.c:2580)' -> the alert
            detail = re.sub(r"\[SSL[^]]*\]\s*|\s*\(_ssl\.c:\d+\)", "", text.split(": ", 1)[-1])
            self._last_error = detail.strip() or text

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if not self._connack.ready():
            self._connack.set(reason)

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        why = self._last_error or f"{reason.getName()} (0x{reason.value:02X})"
        self._finish(self.closed_reason or why)

    def _on_ack(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _props: Any
    ) -> None:
        result = self._acks.get(mid)
        if result is not None and not result.ready():
            result.set(list(codes))

    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, code: ReasonCode, _props: Any
    ) -> None:
        result = self._acks.pop(mid, None)
        if code.is_failure and result is not None and not result.ready():
            result.set_exception(
                PublishRefused(
                    f"the broker refused a publish: {code.getName()} (0x{code.value:02X})",
                    "",
                    code.value,
                )
            )

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        delivered = Message(message.topic, bytes(message.payload))
        handler = self._routes.get(delivered.topic)
        if handler is not None:
            try:
                handler(delivered)
            except Exception:
                log.exception("connection %s: handler for %s failed", self.client_id, message.topic)
        for waiter in self._waiters.get(delivered.topic, ()):
            if not waiter.result.ready() and (waiter.match is None or waiter.match(delivered)):
                waiter.result.set(delivered)
                return
