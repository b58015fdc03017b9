"""The services' MQTT 5 client protocol, sans-IO: bytes in, bytes out, no socket, no thread.

`ClientProtocol` is the state of one client session (h11's style): feed it what the broker
sent (`receive`), take what to send (`data_to_send`), hand the received PUBLISHes over in
batches (`take_batch`) and acknowledge them when they are handled (`acknowledge`).
`broker.service_connection` drives it over TLS on a thread of its own. It speaks only what
the services need: MQTT 5, a persistent session, QoS 1 publishes out (within the broker's
Receive Maximum, refilled the moment a PUBACK arrives; resent with DUP after a reconnect),
QoS 1 and 2 publishes in (a QoS 2 request resent before its PUBREL is not handed over twice).
Packet-level tests: tests/test_mqtt5_client.py.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("fleet.mqtt")

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"

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
SESSION_EXPIRY, RECEIVE_MAXIMUM, SERVER_KEEP_ALIVE, MAXIMUM_PACKET_SIZE = 0x11, 0x21, 0x13, 0x27


class ProtocolError(ConnectionError):
    """The broker sent something this client cannot read; the connection is dropped."""


class Refused(ConnectionError):
    """The broker answered CONNECT with something else than success."""


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


# ---------------------------------------------------------------------------- codec


def read_varint(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
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


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def encode_string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def read_properties(
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
            parsed = read_varint(data, pos, end)
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


def packet(header: int, body: bytes) -> bytes:
    return bytes((header,)) + encode_varint(len(body)) + body


def connect_packet(client_id: str, keepalive: int, clean_start: bool, properties: bytes) -> bytes:
    flags = 0x02 if clean_start else 0x00
    body = (
        encode_string("MQTT")
        + bytes((5, flags))
        + keepalive.to_bytes(2, "big")
        + encode_varint(len(properties))
        + properties
        + encode_string(client_id)
    )
    return packet(0x10, body)


def split_packet(data: bytes | bytearray, pos: int = 0) -> tuple[int, int] | None:
    """(body start, body end) of the whole packet whose fixed header starts at ``pos``, or
    None while it is incomplete."""
    end = len(data)
    if end - pos < 2:
        return None
    parsed = read_varint(data, pos + 1, end)
    if parsed is None or parsed[1] + parsed[0] > end:
        return None
    length, start = parsed
    return start, start + length


# ------------------------------------------------------------------------- session


class ClientProtocol:
    """One client's MQTT 5 session state. Not thread-safe, except `publish` (a deque append),
    which another thread may call while the driver's thread runs the rest."""

    def __init__(
        self,
        client_id: str,
        *,
        session_expiry: int = 0,
        keepalive: int = 30,
        receive_maximum: int = 64,
    ) -> None:
        self.client_id = client_id
        self.keepalive = keepalive
        properties = bytes((SESSION_EXPIRY,)) + session_expiry.to_bytes(4, "big")
        properties += bytes((RECEIVE_MAXIMUM,)) + receive_maximum.to_bytes(2, "big")
        self._connect_properties = properties
        self._out = bytearray()
        self.held: deque[Inbound] = deque()  # received, not yet handed over
        self.queued: deque[tuple[bytes, bytes, bytes]] = deque()  # publishes awaiting quota
        self.inflight: dict[int, bytes] = {}  # packet id -> PUBLISH packet, until its PUBACK
        self._qos2: set[int] = set()  # QoS 2 requests handled, PUBREL not yet received
        self.window = 65535  # the broker's Receive Maximum (from CONNACK)
        self.max_packet = 268435455
        self._mid = 0
        self.ping_outstanding = False

    # ---------------------------------------------------------------- connection

    def connect(self) -> bytes:
        """The CONNECT packet (clean start off: the session persists)."""
        return connect_packet(self.client_id, self.keepalive, False, self._connect_properties)

    def on_connack(self, header: int, body: bytes) -> None:
        """A CONNACK (or Refused): take the broker's limits, resend what awaits its PUBACK
        with DUP set (spec 4.4), forget held requests (the broker sends them again)."""
        if header >> 4 != 2 or len(body) < 2:
            raise Refused(f"answered CONNECT with packet type {header >> 4}")
        if body[1] >= 0x80:
            reason = ReasonCode(PacketTypes.CONNACK, identifier=body[1])
            raise Refused(f"refused the connection: {reason}")
        parsed = read_varint(body, 2, len(body))
        values = read_properties(body, parsed[1], parsed[1] + parsed[0])[0] if parsed else {}
        self.window = int(values.get(RECEIVE_MAXIMUM, 65535))
        self.max_packet = int(values.get(MAXIMUM_PACKET_SIZE, 268435455))
        self.keepalive = int(values.get(SERVER_KEEP_ALIVE, self.keepalive))
        if not body[0] & 0x01:  # no session: the broker forgot the QoS 2 exchanges too
            self._qos2.clear()
        self._out.clear()
        self.held.clear()
        self.ping_outstanding = False
        for sent in self.inflight.values():
            self._out += bytes((sent[0] | 0x08,)) + sent[1:]
        self.fill_window()

    # ---------------------------------------------------------------- writing

    def publish(
        self, topic: str, payload: bytes, user_properties: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Queue a QoS 1 publish (sent as soon as the broker's Receive Maximum allows)."""
        properties = b"".join(
            b"\x26" + encode_string(name) + encode_string(value) for name, value in user_properties
        )
        self.queued.append((encode_string(topic), payload, properties))  # thread-safe

    def fill_window(self) -> None:
        """Send queued publishes while fewer than Receive Maximum await their PUBACK."""
        while self.queued and len(self.inflight) < self.window:
            topic, payload, properties = self.queued.popleft()
            self._mid = self._mid % 65535 + 1
            while self._mid in self.inflight:
                self._mid = self._mid % 65535 + 1
            body = (
                topic
                + self._mid.to_bytes(2, "big")
                + encode_varint(len(properties))
                + properties
                + payload
            )
            made = packet(0x32, body)
            if len(made) > self.max_packet:
                log.error(
                    "dropped a %d-byte publish: the broker takes at most %d",
                    len(made),
                    self.max_packet,
                )
                continue
            self.inflight[self._mid] = made
            self._out += made

    def ping(self) -> None:
        self._out += PINGREQ
        self.ping_outstanding = True

    def disconnect(self) -> None:
        self.fill_window()
        self._out += DISCONNECT

    def data_to_send(self) -> bytearray:
        """The bytes to write, in order; the caller removes what it wrote (`sent`)."""
        return self._out

    def sent(self, count: int) -> None:
        del self._out[:count]

    # ---------------------------------------------------------------- reading

    def receive(self, data: bytearray) -> None:
        """Take every whole packet at the start of ``data`` out of it (a partial one stays)."""
        pos = 0
        while (found := split_packet(data, pos)) is not None:
            start, end = found
            self._handle(data[pos], data, start, end)
            pos = end
        del data[:pos]

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
            parsed = read_varint(data, pos, end)
            if parsed is None:
                raise ProtocolError("truncated PUBLISH")
            length, pos = parsed
            users = read_properties(data, pos, pos + length)[1] if length else []
            if qos == 2 and mid in self._qos2:  # a resent QoS 2 request: handled already
                self._out += b"\x50\x02" + mid.to_bytes(2, "big")
                return
            payload = bytes(data[pos + length : end])
            self.held.append(Inbound(topic, payload, qos, mid, UserProperties(users)))
        elif kind == 4:  # PUBACK
            mid = int.from_bytes(data[pos : pos + 2], "big")
            acked = self.inflight.pop(mid, None)
            if end - pos > 2 and data[pos + 2] >= 0x80 and acked is not None:
                log.warning("the broker refused a publish: reason 0x%02x", data[pos + 2])
        elif kind == 6:  # PUBREL
            mid = int.from_bytes(data[pos : pos + 2], "big")
            self._qos2.discard(mid)
            self._out += b"\x70\x02" + mid.to_bytes(2, "big")
        elif kind == 13:  # PINGRESP
            self.ping_outstanding = False
        elif kind == 14:  # DISCONNECT
            reason = data[pos] if end > pos else 0
            raise ConnectionError(f"the broker disconnected us (reason 0x{reason:02x})")
        else:
            raise ProtocolError(f"unexpected packet type {kind}")

    # ---------------------------------------------------------------- handing over

    def take_batch(self, limit: int) -> list[Inbound]:
        count = min(len(self.held), limit)
        return [self.held.popleft() for _ in range(count)]

    def acknowledge(self, batch: Sequence[Inbound]) -> None:
        """The batch is handled (committed): PUBACK, or PUBREC for QoS 2."""
        for message in batch:
            if message.qos == 1:
                self._out += b"\x40\x02" + message.mid.to_bytes(2, "big")
            elif message.qos == 2:
                self._qos2.add(message.mid)
                self._out += b"\x50\x02" + message.mid.to_bytes(2, "big")
