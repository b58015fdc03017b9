"""The asyncio MQTT 5 transport over mutual TLS, used by the agent and by the simulator.

paho-mqtt does the MQTT protocol; asyncio does all the I/O. The TCP connect and the TLS handshake
run on the event loop itself (non-blocking socket, ``loop.sock_connect`` and a ``do_handshake``
loop that waits for readability/writability), so connecting never blocks the loop and needs no
thread. The connected TLS socket is then handed to a paho ``Client`` driven through its
external-loop API (``loop_read`` / ``loop_write`` / ``loop_misc`` from ``add_reader`` /
``add_writer`` / one timer). One session = one socket, one paho object, a few futures: no
thread, no queue per device.

Errors say which stage failed: `BrokerUnreachable` (DNS/TCP), `TlsFailure` (the broker is not
trusted, or it refused our certificate), `ConnectRefused` (CONNACK failure code),
`SessionTimeout`, `ConnectionLost`, `SubscribeRefused`, `PublishRefused`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

T = TypeVar("T")

#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
X509_NAME_MISMATCH = (62, 64)

log = logging.getLogger("fleet.agent.session")

# CONNACK reason codes (MQTT 5, 3.2.2.2) that mean "this identity is not welcome".
NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
BANNED = 0x8A
IDENTITY_REFUSALS = frozenset({NOT_AUTHORIZED, BAD_CREDENTIALS, BANNED})
#: DISCONNECT reason: the broker's operator ended the connection (a kick, e.g. on revocation).
ADMINISTRATIVE_ACTION = 0x98

# The paho internals we rely on (paho 2.x): where reconnect() gets its socket, and the
# per-topic callback matcher every incoming message is looked up in.
if not hasattr(mqtt.Client, "_create_socket") or not hasattr(
    mqtt.Client(CallbackAPIVersion.VERSION2), "_on_message_filtered"
):  # pragma: no cover - guards a paho upgrade
    raise ImportError("agent.session needs paho-mqtt 2.x (_create_socket, _on_message_filtered)")


# ----------------------------------------------------------------------------- errors


class SessionError(Exception):
    """An MQTT session could not be set up or used; the message names the cause."""


class BrokerUnreachable(SessionError):
    """No TCP connection: name not resolved, connection refused, no route."""


class TlsFailure(SessionError):
    """The TLS handshake failed. ``peer_refused``: the broker refused our certificate (as
    opposed to us not trusting the broker)."""

    def __init__(self, message: str, *, peer_refused: bool = False) -> None:
        super().__init__(message)
        self.peer_refused = peer_refused


class ConnectRefused(SessionError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, message: str, reason_code: int, reason: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.reason = reason

    @property
    def identity_refused(self) -> bool:
        return self.reason_code in IDENTITY_REFUSALS


class SessionTimeout(SessionError, TimeoutError):
    """A step did not complete in time."""


class ConnectionLost(SessionError):
    """The connection closed while something was waiting on it."""


class SubscribeRefused(SessionError):
    def __init__(self, message: str, topic_filter: str, reason_code: int) -> None:
        super().__init__(message)
        self.topic_filter = topic_filter
        self.reason_code = reason_code


class PublishRefused(SessionError):
    def __init__(self, message: str, topic: str, reason_code: int) -> None:
        super().__init__(message)
        self.topic = topic
        self.reason_code = reason_code


# ------------------------------------------------------------------------------- TLS


# A context, or what gives one right before a connection's TLS object is made (no await in
# between): OpenSSL copies the context's certificate and key into the connection then, so a
# context shared by several identities can be loaded with the right one (simulator/shared_tls).
TlsSource = ssl.SSLContext | Callable[[], ssl.SSLContext]


def verifying_context(ca_file: Path | str) -> ssl.SSLContext:
    """TLS >= 1.2 with the broker's certificate and host name verified against ``ca_file``;
    no client identity yet."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise SessionError(f"cannot load the CA file {ca_file}: {describe_error(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_context(ca_file: Path | str, cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    """Mutual TLS >= 1.2; the broker's certificate and host name verified against ``ca_file``.

    A context can be shared by every session that uses the same identity.
    """
    context = verifying_context(ca_file)
    load_identity(context, cert_file, key_file)
    return context


def load_identity(context: ssl.SSLContext, cert_file: Path | str, key_file: Path | str) -> None:
    """Put the certificate and its key into ``context``; SessionError if they do not pair."""
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        # Never echo key material: say what is wrong in words of our own.
        if isinstance(exc, ssl.SSLError):
            why = (
                "the key does not belong to the certificate"
                if "KEY_VALUES_MISMATCH" in str(exc)
                else "not a PEM certificate and an unencrypted PEM key"
            )
        else:
            why = describe_error(exc)
        raise SessionError(
            f"cannot use the certificate {cert_file} with the key {key_file}: {why}"
        ) from None


def describe_error(exc: BaseException) -> str:
    """An OS or TLS error in plain words (it never carries key material)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message or getattr(exc, "reason", None) or exc)
    if isinstance(exc, ssl.SSLError):
        text = str(getattr(exc, "reason", None) or exc.strerror or exc)
        text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", text)
        text = re.sub(r"^\[SSL(: [A-Z0-9_]+)?\]\s*", "", text)
        return text.replace("_", " ").lower()
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _wait_fd(
    loop: asyncio.AbstractEventLoop, fd: int, *, write: bool, timeout: float
) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(waiter, max(0.0, timeout))
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def handshake_failure(exc: BaseException, where: str, timeout: float) -> SessionError:
    """What a failed TLS handshake with ``where`` means, for every transport: the broker not
    trusted (our side), an alert (the broker refused us), a timeout, or a connection closed
    without an alert, which refuses nothing (see TlsFailure)."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | socket.timeout):
        return SessionTimeout(f"TLS handshake with {where} did not finish in {timeout:g} s")
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = "check broker.ca_file and broker.endpoint"
        if exc.verify_code in X509_NAME_MISMATCH:
            hint = (
                "the broker certificate does not name this endpoint: use a name it has, or, "
                "on an mqtt-fleet broker side, add it: fleet-broker broker-cert --host NAME"
            )
        return TlsFailure(f"the broker at {where} is not trusted: {describe_error(exc)} ({hint})")
    why = describe_error(exc)
    if isinstance(exc, ssl.SSLError):
        if "wrong version number" in why:  # what OpenSSL says when the answer is not TLS
            why += f" (is {where} a TLS port? mqtt-fleet's broker listens with TLS, often 8883)"
        return TlsFailure(f"TLS handshake with {where} failed: {why}", peer_refused="alert" in why)
    # A reset without an alert: what a broker that is stopping or starting does (Mosquitto
    # refuses a certificate with an alert; AWS IoT closes JITP's first connection): transient.
    return TlsFailure(f"{where} closed the connection during the TLS handshake: {why}")


async def open_tls(
    host: str,
    port: int,
    context: TlsSource,
    timeout: float,
    timings: dict[str, float] | None = None,
) -> ssl.SSLSocket:
    """TCP connect and TLS handshake without blocking the event loop. With ``timings``, the
    seconds each took go in as "tcp_connect" and "tls_handshake"."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    began = loop.time()
    where = f"{host}:{port}"
    try:
        ip = ipaddress.ip_address(host)
        addresses: Sequence[tuple[Any, ...]] = [
            (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))
        ]
    except ValueError:
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
            )
        except asyncio.TimeoutError:
            raise SessionTimeout(f"resolving {host} took longer than {timeout:g} s") from None
        except OSError as exc:
            raise BrokerUnreachable(f"cannot resolve {host}: {describe_error(exc)}") from None
        addresses = [(family, address) for family, _, _, _, address in infos]

    sock: socket.socket | None = None
    last_error: OSError | None = None
    for family, address in addresses:
        candidate = socket.socket(family, socket.SOCK_STREAM)
        candidate.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(candidate, address), deadline - loop.time())
        except asyncio.TimeoutError:
            candidate.close()
            raise SessionTimeout(
                f"no TCP connection to {where} within {timeout:g} s (firewall? wrong host?)"
            ) from None
        except OSError as exc:
            candidate.close()
            last_error = exc
            continue
        except BaseException:
            candidate.close()
            raise
        sock = candidate
        break
    connected = loop.time()
    if sock is None:
        reason = describe_error(last_error) if last_error else "no address"
        raise BrokerUnreachable(f"cannot reach the broker at {where}: {reason}")

    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready = context() if callable(context) else context
        tls = ready.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _wait_fd(loop, tls.fileno(), write=False, timeout=deadline - loop.time())
            except ssl.SSLWantWriteError:
                await _wait_fd(loop, tls.fileno(), write=True, timeout=deadline - loop.time())
    except (asyncio.TimeoutError, ssl.SSLError, OSError) as exc:
        tls.close()
        raise handshake_failure(exc, where, timeout) from None
    except BaseException:
        tls.close()
        raise
    if timings is not None:
        timings["tcp_connect"] = connected - began
        timings["tls_handshake"] = loop.time() - connected
    return tls


# --------------------------------------------------------------------------- session


async def wait_future(
    future: asyncio.Future[T], timeout: float, on_timeout: Callable[[], Exception]
) -> T:
    """Await ``future`` for at most ``timeout`` seconds, then fail it with ``on_timeout()``.

    Unlike ``asyncio.wait_for`` before Python 3.12, a cancellation that arrives as the future
    completes is never swallowed: the future is awaited directly, with no task around it.
    """
    loop = asyncio.get_running_loop()

    def expire() -> None:
        if not future.done():
            future.set_exception(on_timeout())

    timer = loop.call_later(max(0.0, timeout), expire)
    try:
        return await future
    finally:
        timer.cancel()


@dataclass(frozen=True)
class Will:
    """The Last Will: published by the broker if the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes = field(repr=False)


class _NoTopicCallbacks(MQTTMatcher):
    """We register no per-topic callbacks (routing is ours), so no lookup is needed. paho's
    lookup builds a self-referencing closure per message: cyclic garbage that, at a few
    thousand sessions per process, made the collector stall the loop for 50-100 ms."""

    def iter_match(self, topic: str) -> Iterator[Any]:
        return iter(())


class PahoOnSocket(mqtt.Client):
    """paho's MQTT 5 protocol on a socket its owner connected (TCP and TLS, each with its own
    error) and set in ``prepared`` before ``connect()``; the owner also routes messages (no
    per-topic callbacks) and reconnects. Shared by this session and the Locust transport."""

    prepared: ssl.SSLSocket | None = None

    def __init__(self, client_id: str) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        # paho's MQTTMatcher has no annotations; ours is typed.
        self._on_message_filtered = _NoTopicCallbacks()  # type: ignore[no-untyped-call]

    def _create_socket(self) -> ssl.SSLSocket:
        sock, self.prepared = self.prepared, None
        if sock is None:
            raise ConnectionError("reconnecting is the owner's job, not paho's")
        return sock


MessageHandler = Callable[[Message], None]


class Session:
    """One live MQTT 5 connection. Use `connect()` to make one."""

    def __init__(self, client_id: str, host: str, port: int, keepalive: int) -> None:
        self.client_id = client_id
        self.host = host
        self.port = port
        self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._loop = asyncio.get_running_loop()
        self._keepalive = keepalive
        self._fd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._connack: asyncio.Future[tuple[int, str]] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._waiters: dict[str, list[asyncio.Future[Message]]] = {}
        self._request_locks: dict[tuple[str, ...], asyncio.Lock] = {}
        self._subscribed: set[str] = set()
        self._last_error: str | None = None
        self._routes: dict[str, MessageHandler] = {}
        self.handler: MessageHandler | None = None
        self.disconnect_reason: str | None = None
        #: The reason code of the broker's DISCONNECT, or paho's code for a lost connection.
        self.disconnect_code: int | None = None

        client = PahoOnSocket(client_id)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_log  # until CONNACK: keeps the TLS alert that refused us
        self._client = client

    # ------------------------------------------------------------------ public

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def route(self, topic: str, handler: MessageHandler) -> None:
        """Deliver messages on exactly ``topic`` to ``handler`` (on the event loop thread).

        Messages awaited by `request` go there first; messages no route takes go to
        ``self.handler``."""
        self._routes[topic] = handler

    async def subscribe(
        self, *topic_filters: str, qos: int = 1, timeout: float = 10.0
    ) -> list[int]:
        """SUBSCRIBE in one packet; raise SubscribeRefused if any filter's SUBACK is a failure."""
        if not topic_filters:
            return []
        self._check_open()
        rc, mid = self._client.subscribe([(f, SubscribeOptions(qos=qos)) for f in topic_filters])
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionLost(f"cannot subscribe on {self.where}: {mqtt.error_string(rc)}")
        codes: list[ReasonCode] = await self._await_ack(
            mid, f"SUBACK for {topic_filters[0]}", timeout
        )
        for topic_filter, code in zip(topic_filters, codes, strict=False):
            if code.is_failure:
                raise SubscribeRefused(
                    f"the broker refused the subscription to {topic_filter}: "
                    f"{code.getName()} (0x{code.value:02X})",
                    topic_filter,
                    code.value,
                )
        self._subscribed.update(topic_filters)
        return [code.value for code in codes]

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """PUBLISH; with QoS 1 wait for the PUBACK and raise PublishRefused on a failure code."""
        self._check_open()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"cannot publish on {self.where}: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        code: ReasonCode = await self._await_ack(info.mid, f"PUBACK for {topic}", timeout)
        if code.is_failure:
            raise PublishRefused(
                f"the broker refused the publish to {topic}: {code.getName()} (0x{code.value:02X})",
                topic,
                code.value,
            )

    async def request(
        self, topic: str, payload: bytes, reply_topics: Iterable[str], timeout: float = 10.0
    ) -> Message:
        """Publish and return the first message on one of ``reply_topics``.

        Subscribes to the reply topics first (once per session), so the reply cannot be missed.
        Requests sharing reply topics run one at a time: the AWS API has no correlation id.
        """
        replies = tuple(reply_topics)
        lock = self._request_locks.setdefault(replies, asyncio.Lock())
        try:
            async with lock:
                return await asyncio.wait_for(self._request(topic, payload, replies), timeout)
        except asyncio.TimeoutError:
            raise SessionTimeout(
                f"no reply to {topic} on {self.where} within {timeout:g} s"
            ) from None

    async def _request(self, topic: str, payload: bytes, replies: tuple[str, ...]) -> Message:
        missing = [t for t in replies if t not in self._subscribed]
        if missing:
            await self.subscribe(*missing)
        reply: asyncio.Future[Message] = self._loop.create_future()
        for t in replies:
            self._waiters.setdefault(t, []).append(reply)
        try:
            await self.publish(topic, payload)
            return await reply
        finally:
            for t in replies:
                waiting = self._waiters.get(t)
                if waiting is not None:
                    with contextlib.suppress(ValueError):
                        waiting.remove(reply)
                    if not waiting:
                        del self._waiters[t]

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT (normal) and close; idempotent."""
        if self.closed:
            return
        self.disconnect_reason = "closed by us"
        self._client.disconnect()
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except asyncio.TimeoutError:
            self.abort()

    def abort(self) -> None:
        """Close the socket at once, without DISCONNECT."""
        sock = self._client.socket()
        self._unwatch()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._finish(self.disconnect_reason or "aborted")

    # -------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionLost(
                f"the connection to {self.where} is closed ({self.disconnect_reason})"
            )

    async def _await_ack(self, mid: int, what: str, timeout: float) -> Any:
        ack: asyncio.Future[Any] = self._loop.create_future()
        self._acks[mid] = ack
        try:
            return await wait_future(
                ack,
                timeout,
                lambda: SessionTimeout(f"no {what} from {self.where} within {timeout:g} s"),
            )
        finally:
            self._acks.pop(mid, None)

    async def _start(
        self,
        sock: ssl.SSLSocket,
        clean_start: bool,
        session_expiry: int,
        timeout: float,
        will: Will | None = None,
    ) -> None:
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        # Without an expiry the property is left out (0 is MQTT 5's default): paho keeps the
        # Properties object for the session's life, ~1 KB a device in a large fleet.
        properties: Properties | None = None
        if session_expiry:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = session_expiry
        self._client.prepared = sock
        try:
            rc = self._client.connect(
                self.host,
                self.port,
                self._keepalive,
                clean_start=clean_start,
                properties=properties,
            )
        except OSError as exc:
            self._client.prepared = None
            sock.close()
            raise ConnectionLost(
                f"cannot start MQTT on {self.where}: {describe_error(exc)}"
            ) from None
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self.abort()
            raise ConnectionLost(f"cannot send CONNECT to {self.where}: {mqtt.error_string(rc)}")
        try:
            reason = await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        except asyncio.TimeoutError:
            self.abort()
            raise SessionTimeout(f"no CONNACK from {self.where} within {timeout:g} s") from None
        finally:
            self._client.on_log = None
        code, name = reason
        if code >= 0x80:
            self.abort()
            raise ConnectRefused(
                f"{self.where} refused the connection: {name} (0x{code:02X})", code, name
            )
        self._schedule_misc()

    # paho callbacks: all run on the event loop thread, from _on_readable/_on_writable.

    def _on_socket_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_socket_close(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        self._unwatch()

    def _on_register_write(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        if self._fd >= 0:
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_unregister_write(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        if self._fd >= 0:
            self._loop.remove_writer(self._fd)

    def _unwatch(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            self._fd = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_readable(self) -> None:
        try:
            self._client.loop_read()
            # Decrypted bytes can wait inside the TLS layer with nothing left on the socket.
            sock = self._client.socket()
            while sock is not None and isinstance(sock, ssl.SSLSocket) and sock.pending():
                self._client.loop_read()
                sock = self._client.socket()
        except Exception:
            log.exception("session %s: error while reading", self.client_id)
            self.disconnect_reason = "internal error while reading"
            self.abort()

    def _on_writable(self) -> None:
        try:
            self._client.loop_write()
        except Exception:
            log.exception("session %s: error while writing", self.client_id)
            self.disconnect_reason = "internal error while writing"
            self.abort()

    def _schedule_misc(self) -> None:
        interval = max(1.0, self._keepalive / 4)
        self._timer = self._loop.call_later(interval, self._misc)

    def _misc(self) -> None:
        self._timer = None
        if self.closed:
            return
        self._client.loop_misc()
        if not self.closed:
            self._schedule_misc()

    def _on_log(self, _client: mqtt.Client, _userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = text

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if not self._connack.done():
            # The code and its name, not paho's ReasonCode: that copies a names table per
            # instance, and the future lives as long as the session.
            self._connack.set_result((reason.value, reason.getName()))

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if self.disconnect_code is None:
            self.disconnect_code = reason.value
        if self.disconnect_reason is None:
            self.disconnect_reason = (
                self._last_error or f"{reason.getName()} (0x{reason.value:02X})"
            )
        self._finish(self.disconnect_reason)

    def _finish(self, why: str) -> None:
        """Connection over: fail everything still waiting on it."""
        self._unwatch()
        if self._closed.done():
            return
        self._closed.set_result(None)
        if not self._connack.done():
            error = closed_before_connack(self.where, self._last_error or why, why)
            self._connack.set_exception(error)
            self._connack.exception()  # retrieved: no "never retrieved" warning if unawaited
        lost = ConnectionLost(f"the connection to {self.where} closed ({why})")
        pending = [*self._acks.values(), *(f for w in self._waiters.values() for f in w)]
        for future in pending:
            if not future.done():
                future.set_exception(lost)
                future.exception()  # whoever awaits it still gets it; no GC-time warning

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _props: Any
    ) -> None:
        future = self._acks.get(mid)
        if future is not None and not future.done():
            future.set_result(list(codes))

    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, code: ReasonCode, _props: Any
    ) -> None:
        future = self._acks.get(mid)
        if future is not None and not future.done():
            future.set_result(code)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        delivered = Message(message.topic, bytes(message.payload))
        for future in self._waiters.get(delivered.topic, ()):
            if not future.done():
                future.set_result(delivered)
                return
        handler = self._routes.get(delivered.topic, self.handler)
        if handler is not None:
            try:
                handler(delivered)
            except Exception:
                log.exception("session %s: message handler failed", self.client_id)
        else:
            log.debug("session %s: unexpected message on %s", self.client_id, delivered.topic)


def closed_before_connack(where: str, detail: str, why: str) -> SessionError:
    """The connection ended before CONNACK, for every transport: ``detail`` is the last
    socket or TLS error seen (or ``why``). Only an alert refuses us; see handshake_failure."""
    refused = "alert" in detail.lower()
    if refused or "ssl" in detail.lower():
        return TlsFailure(
            f"{where} closed the TLS connection before CONNACK: {_tls_detail(detail)}",
            peer_refused=refused,
        )
    return ConnectionLost(f"{where} closed the connection before CONNACK ({why})")


def _tls_detail(text: str) -> str:
    """'failed to receive on socket: [SSL: X] sslv3 alert certificate revoked (_ssl.c:1)' ->
    'sslv3 alert certificate revoked'."""
    detail = text.split(": ", 1)[-1]
    if "]" in detail:
        detail = detail.split("]", 1)[1]
    return detail.split(" (_ssl.c", 1)[0].strip() or text


async def connect(
    endpoint: str,
    port: int,
    *,
    client_id: str,
    context: TlsSource | None = None,
    ca: Path | str | None = None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
    timeout: float = 10.0,
    keepalive: int = 60,
    clean_start: bool = True,
    session_expiry: int = 0,
    will: Will | None = None,
    timings: dict[str, float] | None = None,
) -> Session:
    """Connect with MQTT 5 over mutual TLS; return the session once CONNACK says success.

    Give either ``context`` (shared between sessions of one identity, or a TlsSource) or
    ``ca``/``cert``/``key``.
    ``timeout`` bounds the whole connect: TCP, TLS and CONNACK. With ``timings``, the seconds
    of each stage go in: "tcp_connect", "tls_handshake", "connack" (CONNECT to CONNACK).
    """
    if context is None:
        if ca is None or cert is None or key is None:
            raise ValueError("connect() needs either context= or ca=, cert= and key=")
        context = tls_context(ca, cert, key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sock = await open_tls(endpoint, port, context, timeout, timings)
    mqtt_started = loop.time()
    session = Session(client_id, endpoint, port, keepalive)
    try:
        await session._start(
            sock, clean_start, session_expiry, max(0.1, deadline - loop.time()), will
        )
    except BaseException:
        session.abort()
        raise
    if timings is not None:
        timings["connack"] = loop.time() - mqtt_started
    return session
