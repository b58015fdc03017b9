"""`ServiceConnection`: the services process's own MQTT 5 client over mutual TLS.

paho-mqtt cost the services process more than the shadow rules themselves: three TLS reads
and a Properties object per packet, and, worse, the broker's Receive Maximum (20) was refilled
only once per loop round, so replies queued behind PUBACKs while the CPU idled. Measured with
bench/shadow_throughput.py: paho with the same batching reached 1,975-2,141 updates/s at 91 %
of a core; this client 4,300/s at about half a core. It speaks only what the services need:
MQTT 5, persistent session, QoS 1 publishes out, QoS 1/2 publishes in. It reads whatever
arrived in one go, hands the PUBLISHes to one batch callback and acknowledges them only after
it returned (a shadow batch is committed by then), and refills the reply window the moment a
PUBACK arrives. Operator tools and tests keep using paho (broker/mqtt.py).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from broker.mqtt import ConnectError

log = logging.getLogger("fleet.mqtt")

_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_WRITE_CHUNK = 65536

# MQTT 5 property identifiers -> value size: bytes, or a kind below (spec 2.2.2.2).
_VARINT, _LENGTH, _PAIR = -1, -2, -3
_PROPERTY_SIZE = {
    0x01: 1,
    0x02: 4,
    0x03: _LENGTH,
    0x08: _LENGTH,
    0x09: _LENGTH,
    0x0B: _VARINT,
    0x11: 4,
    0x12: _LENGTH,
    0x13: 2,
    0x15: _LENGTH,
    0x16: _LENGTH,
    0x17: 1,
    0x18: 4,
    0x19: 1,
    0x1A: _LENGTH,
    0x1C: _LENGTH,
    0x1F: _LENGTH,
    0x21: 2,
    0x22: 2,
    0x23: 2,
    0x24: 1,
    0x25: 1,
    0x26: _PAIR,
    0x27: 4,
    0x28: 1,
    0x29: 1,
    0x2A: 1,
}


class ProtocolError(ConnectionError):
    """The broker sent something this client cannot read; the connection is dropped."""


class UserProperties(NamedTuple):
    # Named like paho's attribute, so broker.identity.sender_of reads an Inbound unchanged.
    UserProperty: list[tuple[str, str]]


class Inbound(NamedTuple):
    """A PUBLISH the broker delivered to the services."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    properties: UserProperties


BatchCallback = Callable[[list[Inbound]], None]


def _varint(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(value, next position) of a Variable Byte Integer, or None if it is incomplete."""
    value = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ProtocolError("malformed variable byte integer")
    return None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _properties(
    data: bytes | bytearray, pos: int, end: int
) -> tuple[dict[int, int | bytes], list[tuple[str, str]]]:
    """Single-valued properties by identifier (integers, or the bytes of a string or binary
    data), and the user properties in order."""
    values: dict[int, int | bytes] = {}
    users: list[tuple[str, str]] = []
    while pos < end:
        ident = data[pos]
        size = _PROPERTY_SIZE.get(ident)
        pos += 1
        if size is None:
            raise ProtocolError(f"unknown property 0x{ident:02x}")
        if size > 0:
            values[ident] = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif size == _VARINT:
            parsed = _varint(data, pos, end)
            if parsed is None:
                raise ProtocolError("truncated property")
            values[ident], pos = parsed
        else:
            length = int.from_bytes(data[pos : pos + 2], "big")
            first = bytes(data[pos + 2 : pos + 2 + length])
            pos += 2 + length
            if size == _LENGTH:
                values[ident] = first
            else:
                length = int.from_bytes(data[pos : pos + 2], "big")
                users.append((first.decode(), bytes(data[pos + 2 : pos + 2 + length]).decode()))
                pos += 2 + length
    if pos != end:
        raise ProtocolError("truncated properties")
    return values, users


def _packet(header: int, body: bytes) -> bytes:
    return bytes((header,)) + _encode_varint(len(body)) + body


def _connect_packet(client_id: str, keepalive: int, clean_start: bool, properties: bytes) -> bytes:
    flags = 0x02 if clean_start else 0x00
    body = (
        _string("MQTT")
        + bytes((5, flags))
        + keepalive.to_bytes(2, "big")
        + _encode_varint(len(properties))
        + properties
        + _string(client_id)
    )
    return _packet(0x10, body)


class ServiceConnection:
    """The services' MQTT 5 connection: persistent session, QoS 1 replies, batched requests.

    ``on_batch`` runs on the connection's thread with the PUBLISHes that arrived together, in
    arrival order; they are acknowledged when it returns. ``publish`` may be called from any
    thread. All socket I/O happens on the connection's thread (an SSL socket must not be read
    and written from two threads at once); other threads queue and wake it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext,
        client_id: str,
        on_batch: BatchCallback,
        session_expiry: int = 0,
        keepalive: int = 30,
        receive_maximum: int = 64,
        batch_limit: int = 16,
        reconnect_delay: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self._host, self._port, self._context = host, port, context
        self._client_id = client_id
        self._on_batch = on_batch
        self._keepalive = keepalive
        self._batch_limit = batch_limit
        self._reconnect_delay = reconnect_delay
        properties = b"\x11" + session_expiry.to_bytes(4, "big")
        properties += b"\x21" + receive_maximum.to_bytes(2, "big")
        self._connect_properties = properties
        self._sock: ssl.SSLSocket | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._held: deque[Inbound] = deque()  # received, not yet handed to on_batch
        self._queued: deque[tuple[bytes, bytes, bytes]] = deque()  # publishes awaiting quota
        self._inflight: dict[int, bytes] = {}  # packet id -> PUBLISH packet, until its PUBACK
        self._qos2: set[int] = set()  # QoS 2 requests handled, PUBREL not yet received
        self._window = 65535  # the broker's Receive Maximum (from CONNACK)
        self._max_packet = 268435455
        self._mid = 0
        self._last_out = 0.0
        self._ping_sent: float | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public

    def start(self, timeout: float = 10.0) -> None:
        """Connect (ConnectError on refusal or timeout) and start the connection's thread."""
        self._open(timeout)
        self._thread = threading.Thread(target=self._run, name="fleet-mqtt", daemon=True)
        self._thread.start()

    def publish(
        self, topic: str, payload: bytes, user_properties: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Publish at QoS 1 (sent as soon as the broker's Receive Maximum allows)."""
        properties = b"".join(
            b"\x26" + _string(name) + _string(value) for name, value in user_properties
        )
        self._queued.append((_string(topic), payload, properties))  # deque.append: thread-safe
        if threading.current_thread() is not self._thread:
            self._wake()

    def depths(self) -> dict[str, int]:
        """How much is waiting here right now (read from any thread: lengths only)."""
        return {
            "requests_waiting": len(self._held),
            "replies_queued": len(self._queued),
            "replies_in_flight": len(self._inflight),
        }

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is pending and DISCONNECT (the session, and its queue, persist)."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- connection

    def _open(self, timeout: float) -> None:
        where = f"{self._host}:{self._port}"
        try:
            raw = socket.create_connection((self._host, self._port), timeout)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {where}: {exc}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._context.wrap_socket(raw, server_hostname=self._host)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise ConnectError(f"cannot connect to {where}: {exc}") from None
        try:
            sock.sendall(
                _connect_packet(self._client_id, self._keepalive, False, self._connect_properties)
            )
            header, body, rest = self._read_packet_blocking(sock)
        except (OSError, ssl.SSLError, ProtocolError) as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise ConnectError(f"no CONNACK from {where} within {timeout:.0f} s") from None
            raise ConnectError(f"cannot connect to {where}: {exc}") from None
        if header >> 4 != 2 or len(body) < 2:
            sock.close()
            raise ConnectError(f"{where} answered CONNECT with packet type {header >> 4}")
        if body[1] >= 0x80:
            sock.close()
            reason = ReasonCode(PacketTypes.CONNACK, identifier=body[1])
            raise ConnectError(f"{where} refused the connection: {reason}")
        parsed = _varint(body, 2, len(body))
        values = _properties(body, parsed[1], parsed[1] + parsed[0])[0] if parsed else {}
        self._window = int(values.get(0x21, 65535))
        self._max_packet = int(values.get(0x27, 268435455))
        self._keepalive = int(values.get(0x13, self._keepalive))
        if not body[0] & 0x01:  # no session: the broker forgot the QoS 2 exchanges too
            self._qos2.clear()
        sock.setblocking(False)
        self._sock = sock
        self._in[:] = rest  # what the broker sent right after CONNACK
        self._out.clear()
        self._held.clear()  # unacknowledged: the broker sends them again
        self._ping_sent = None
        self._last_out = time.monotonic()
        for packet in self._inflight.values():  # spec 4.4: resend unacknowledged, with DUP
            self._out += bytes((packet[0] | 0x08,)) + packet[1:]
        self._fill_window()

    @staticmethod
    def _read_packet_blocking(sock: ssl.SSLSocket) -> tuple[int, bytes, bytes]:
        """The first packet's type byte and body, and whatever came after it."""
        data = bytearray()
        while True:
            if len(data) >= 2:
                parsed = _varint(data, 1, len(data))
                if parsed is not None and len(data) >= parsed[1] + parsed[0]:
                    end = parsed[1] + parsed[0]
                    return data[0], bytes(data[parsed[1] : end]), bytes(data[end:])
            chunk = sock.recv(4096)
            if not chunk:
                raise ProtocolError("the broker closed the connection")
            data += chunk

    def _run(self) -> None:
        low, high = self._reconnect_delay
        while not self._stopping.is_set():
            try:
                self._serve()
            except (OSError, ssl.SSLError) as exc:  # ProtocolError is a ConnectionError
                log.warning("connection to the broker lost: %s", exc)
            self._close()
            delay = low
            while not self._stopping.wait(delay):
                try:
                    self._open(10.0)
                except ConnectError as exc:
                    log.warning("%s; retrying in %.1f s", exc, min(delay * 2, high))
                    delay = min(delay * 2, high)
                    continue
                log.info("reconnected to the broker")
                break
        self._close()  # stop() may have come while reconnecting

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        readers = [sock, self._wake_r]
        self._receive(sock)  # bytes already inside the TLS layer are invisible to select()
        while not self._stopping.is_set():
            self._fill_window()
            self._keep_alive()
            if self._out:
                self._flush(sock)
            backlog = len(self._queued) >= self._window
            timeout: float | None = None
            if self._held and not backlog:
                timeout = 0.0  # look for PUBACKs, then hand over the next batch
            elif self._keepalive:
                if self._ping_sent is not None:
                    due = self._ping_sent + self._keepalive
                else:
                    due = self._last_out + self._keepalive / 2
                timeout = max(0.0, due - time.monotonic())
            readable, _, _ = select.select(readers, [sock] if self._out else [], [], timeout)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            if sock in readable:
                self._receive(sock)
            if self._held and len(self._queued) < self._window:
                self._dispatch()
        self._goodbye(sock)

    def _goodbye(self, sock: ssl.SSLSocket) -> None:
        self._fill_window()
        self._out += _DISCONNECT
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.settimeout(2.0)
            sock.sendall(self._out)
        self._out.clear()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def _keep_alive(self) -> None:
        if not self._keepalive:
            return
        now = time.monotonic()
        if self._ping_sent is not None:
            if now - self._ping_sent > self._keepalive:
                raise ConnectionError(f"no PINGRESP within {self._keepalive} s")
        elif now - self._last_out >= self._keepalive / 2:
            self._out += _PINGREQ
            self._ping_sent = now

    # ---------------------------------------------------------------- writing

    def _flush(self, sock: ssl.SSLSocket) -> None:
        while self._out:
            try:
                sent = sock.send(self._out[:_WRITE_CHUNK])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return  # select() tells when the socket takes more
            del self._out[:sent]
            self._last_out = time.monotonic()

    def _fill_window(self) -> None:
        """Send queued publishes while fewer than Receive Maximum await their PUBACK."""
        while self._queued and len(self._inflight) < self._window:
            topic, payload, properties = self._queued.popleft()
            self._mid = self._mid % 65535 + 1
            while self._mid in self._inflight:
                self._mid = self._mid % 65535 + 1
            body = (
                topic
                + self._mid.to_bytes(2, "big")
                + _encode_varint(len(properties))
                + properties
                + payload
            )
            packet = _packet(0x32, body)
            if len(packet) > self._max_packet:
                log.error(
                    "dropped a %d-byte publish: the broker takes at most %d",
                    len(packet),
                    self._max_packet,
                )
                continue
            self._inflight[self._mid] = packet
            self._out += packet

    # ---------------------------------------------------------------- reading

    def _receive(self, sock: ssl.SSLSocket) -> None:
        # Read until the TLS layer has nothing more: select() cannot see SSL-buffered bytes.
        closed = False
        while True:
            try:
                chunk = sock.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            if not chunk:
                closed = True
                break
            self._in += chunk
        data, pos, end = self._in, 0, len(self._in)
        while end - pos >= 2:
            parsed = _varint(data, pos + 1, end)
            if parsed is None or parsed[1] + parsed[0] > end:
                break
            length, start = parsed
            self._handle(data[pos], data, start, start + length)
            pos = start + length
        del data[:pos]
        if closed:  # after reading what came before it (a DISCONNECT says why)
            raise ConnectionError("the broker closed the connection")

    def _handle(self, header: int, data: bytearray, pos: int, end: int) -> None:
        kind = header >> 4
        if kind == 3:  # PUBLISH
            qos = (header >> 1) & 3
            length = int.from_bytes(data[pos : pos + 2], "big")
            topic = data[pos + 2 : pos + 2 + length].decode()
            pos += 2 + length
            mid = 0
            if qos:
                mid = int.from_bytes(data[pos : pos + 2], "big")
                pos += 2
            parsed = _varint(data, pos, end)
            if parsed is None:
                raise ProtocolError("truncated PUBLISH")
            length, pos = parsed
            users = _properties(data, pos, pos + length)[1] if length else []
            if qos == 2 and mid in self._qos2:  # a resent QoS 2 request: handled already
                self._out += b"\x50\x02" + mid.to_bytes(2, "big")
                return
            payload = bytes(data[pos + length : end])
            self._held.append(Inbound(topic, payload, qos, mid, UserProperties(users)))
        elif kind == 4:  # PUBACK
            mid = int.from_bytes(data[pos : pos + 2], "big")
            packet = self._inflight.pop(mid, None)
            if end - pos > 2 and data[pos + 2] >= 0x80 and packet is not None:
                log.warning("the broker refused a publish: reason 0x%02x", data[pos + 2])
        elif kind == 6:  # PUBREL
            mid = int.from_bytes(data[pos : pos + 2], "big")
            self._qos2.discard(mid)
            self._out += b"\x70\x02" + mid.to_bytes(2, "big")
        elif kind == 13:  # PINGRESP
            self._ping_sent = None
        elif kind == 14:  # DISCONNECT
            reason = data[pos] if end > pos else 0
            raise ConnectionError(f"the broker disconnected us (reason 0x{reason:02x})")
        else:
            raise ProtocolError(f"unexpected packet type {kind}")

    def _dispatch(self) -> None:
        """Hand over the next batch; acknowledge it once the callback returned."""
        count = min(len(self._held), self._batch_limit)
        batch = [self._held.popleft() for _ in range(count)]
        try:
            self._on_batch(batch)
        except Exception:  # the callback's bug must not take the connection down
            log.exception("handling %d message(s) failed", len(batch))
        for message in batch:
            if message.qos == 1:
                self._out += b"\x40\x02" + message.mid.to_bytes(2, "big")
            elif message.qos == 2:
                self._qos2.add(message.mid)
                self._out += b"\x50\x02" + message.mid.to_bytes(2, "big")
