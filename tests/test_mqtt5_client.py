"""The services' MQTT 5 client protocol (broker/mqtt5_client.py) at the packet level, as
paho's own tests do: bytes in, bytes out, no broker. The stack tests
(tests/test_shadow_service.py, bench/shadow_throughput.py) drive it over real TLS."""

from __future__ import annotations

import pytest

from broker.mqtt5_client import (
    ClientProtocol,
    ProtocolError,
    Refused,
    encode_string,
    encode_varint,
    packet,
    read_properties,
    split_packet,
)

pytestmark = pytest.mark.unit


def connack(*, session_present: bool = False, properties: bytes = b"", reason: int = 0) -> bytes:
    body = bytes((1 if session_present else 0, reason)) + encode_varint(len(properties))
    return body + properties


def receive_maximum(n: int) -> bytes:
    return b"\x21" + n.to_bytes(2, "big")


def connected(window: int = 65535, *, session_present: bool = False) -> ClientProtocol:
    protocol = ClientProtocol("svc")
    protocol.on_connack(
        0x20, connack(session_present=session_present, properties=receive_maximum(window))
    )
    return protocol


def publish_in(topic: str, payload: bytes, *, qos: int, mid: int, dup: bool = False) -> bytes:
    header = 0x30 | (qos << 1) | (0x08 if dup else 0)
    body = encode_string(topic) + (mid.to_bytes(2, "big") if qos else b"") + b"\x00" + payload
    return packet(header, body)


def take(protocol: ClientProtocol) -> bytes:
    out = bytes(protocol.data_to_send())
    protocol.sent(len(out))
    return out


def packets(data: bytes) -> list[tuple[int, bytes]]:
    """(fixed header byte, body) of each packet in ``data``."""
    found, buffer = [], bytearray(data)
    while (whole := split_packet(buffer)) is not None:
        start, end = whole
        found.append((buffer[0], bytes(buffer[start:end])))
        del buffer[:end]
    assert not buffer
    return found


def test_connect_asks_for_a_persistent_session_and_its_receive_maximum() -> None:
    protocol = ClientProtocol("svc", session_expiry=3600, receive_maximum=64)
    [(header, body)] = packets(protocol.connect())
    assert header == 0x10
    assert body[:7] == encode_string("MQTT") + b"\x05" and body[7] & 0x02 == 0  # no clean start
    assert b"\x11" + (3600).to_bytes(4, "big") in body and receive_maximum(64) in body
    assert body.endswith(encode_string("svc"))


def test_a_refused_connack_names_its_reason() -> None:
    with pytest.raises(Refused, match="Not authorized"):
        ClientProtocol("svc").on_connack(0x20, connack(reason=0x87))
    with pytest.raises(Refused, match="packet type 3"):
        ClientProtocol("svc").on_connack(0x30, b"\x00\x00")


def test_publishes_wait_for_the_receive_maximum_and_refill_on_each_puback() -> None:
    protocol = connected(window=2)
    for n in range(5):
        protocol.publish(f"reply/{n}", b"x")
    protocol.fill_window()
    sent = packets(take(protocol))
    assert [h for h, _ in sent] == [0x32, 0x32] and len(protocol.queued) == 3
    mid = int.from_bytes(sent[0][1][len(encode_string("reply/0")) :][:2], "big")
    protocol.receive(bytearray(packet(0x40, mid.to_bytes(2, "big"))))
    protocol.fill_window()
    assert [h for h, _ in packets(take(protocol))] == [0x32]  # one PUBACK, one more out
    assert len(protocol.inflight) == 2 and len(protocol.queued) == 2


def test_unacknowledged_publishes_are_resent_with_dup_after_a_reconnect() -> None:
    protocol = connected()
    protocol.publish("reply/a", b"1")
    protocol.publish("reply/b", b"2")
    protocol.fill_window()
    first = packets(take(protocol))
    protocol.on_connack(0x20, connack(session_present=True))
    resent = packets(take(protocol))
    assert [h for h, _ in resent] == [0x3A, 0x3A]  # QoS 1 with DUP
    assert [b for _, b in resent] == [b for _, b in first]  # same packet ids, same order


def test_requests_are_handed_over_in_order_and_acknowledged_after() -> None:
    protocol = connected()
    data = bytearray(
        publish_in("$aws/a", b"1", qos=1, mid=7) + publish_in("$aws/b", b"2", qos=1, mid=8)
    )
    protocol.receive(data)
    assert take(protocol) == b""  # nothing acknowledged before it is handled
    batch = protocol.take_batch(16)
    assert [(m.topic, m.payload, m.mid) for m in batch] == [
        ("$aws/a", b"1", 7),
        ("$aws/b", b"2", 8),
    ]
    protocol.acknowledge(batch)
    assert take(protocol) == b"\x40\x02\x00\x07\x40\x02\x00\x08"


def test_a_partial_packet_waits_for_the_rest() -> None:
    protocol = connected()
    whole = publish_in("$aws/a", b"payload", qos=1, mid=1)
    data = bytearray(whole[:5])
    protocol.receive(data)
    assert not protocol.held and data == whole[:5]
    data += whole[5:]
    protocol.receive(data)
    assert len(protocol.held) == 1 and not data


def test_a_qos2_request_resent_before_its_pubrel_is_not_handed_over_twice() -> None:
    protocol = connected()
    protocol.receive(bytearray(publish_in("$aws/q", b"once", qos=2, mid=9)))
    protocol.acknowledge(protocol.take_batch(16))
    assert take(protocol) == b"\x50\x02\x00\x09"  # PUBREC after it was handled
    protocol.receive(bytearray(publish_in("$aws/q", b"once", qos=2, mid=9, dup=True)))
    assert not protocol.held  # the resend: PUBREC again, no second delivery
    assert take(protocol) == b"\x50\x02\x00\x09"
    protocol.receive(bytearray(packet(0x62, b"\x00\x09")))  # PUBREL
    assert take(protocol) == b"\x70\x02\x00\x09"  # PUBCOMP
    protocol.receive(bytearray(publish_in("$aws/q", b"new", qos=2, mid=9)))
    assert [m.payload for m in protocol.held] == [b"new"]  # the id is free again


def test_a_new_session_forgets_the_qos2_exchanges() -> None:
    protocol = connected()
    protocol.receive(bytearray(publish_in("$aws/q", b"x", qos=2, mid=3)))
    protocol.acknowledge(protocol.take_batch(16))
    protocol.on_connack(0x20, connack(session_present=False))
    protocol.receive(bytearray(publish_in("$aws/q", b"x", qos=2, mid=3)))
    assert len(protocol.held) == 1


def test_user_properties_arrive_in_order() -> None:
    props = b"".join(
        b"\x26" + encode_string(k) + encode_string(v)
        for k, v in [("fleet-sender", "1 a"), ("b", "")]
    )
    body = encode_string("$aws/t") + b"\x00\x01" + encode_varint(len(props)) + props + b"{}"
    protocol = connected()
    protocol.receive(bytearray(packet(0x32, body)))
    [message] = protocol.take_batch(1)
    assert message.properties.UserProperty == [("fleet-sender", "1 a"), ("b", "")]
    assert message.payload == b"{}"


@pytest.mark.parametrize(
    ("properties", "error"),
    [
        (b"\x7f\x00", "unknown property 0x7f"),  # no such property
        (b"\x0b\xff\xff\xff\xff\x01", "malformed variable byte integer"),
        (b"\x0b\xff", "truncated property"),
        (b"\x21\x00\x05\x26\x00\x03ab", "truncated properties"),  # a pair cut short
    ],
)
def test_malformed_properties_are_a_protocol_error(properties: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        read_properties(properties, 0, len(properties))


def test_a_packet_type_the_client_never_expects_drops_the_connection() -> None:
    with pytest.raises(ProtocolError, match="unexpected packet type 9"):
        connected().receive(bytearray(packet(0x90, b"\x00\x01\x00")))  # SUBACK: we never subscribe


def test_the_broker_s_disconnect_says_its_reason() -> None:
    with pytest.raises(ConnectionError, match="reason 0x8b"):
        connected().receive(bytearray(packet(0xE0, b"\x8b")))


def test_the_broker_s_limits_from_connack_are_kept() -> None:
    protocol = ClientProtocol("svc", keepalive=30)
    properties = receive_maximum(5) + b"\x27" + (100).to_bytes(4, "big") + b"\x13\x00\x0a"
    protocol.on_connack(0x20, connack(properties=properties))
    assert (protocol.window, protocol.max_packet, protocol.keepalive) == (5, 100, 10)
    protocol.publish("t", b"x" * 200)  # over the broker's maximum packet size: dropped
    protocol.fill_window()
    assert take(protocol) == b"" and not protocol.inflight


def test_ping_and_pingresp() -> None:
    protocol = connected()
    protocol.ping()
    assert take(protocol) == b"\xc0\x00" and protocol.ping_outstanding
    protocol.receive(bytearray(b"\xd0\x00"))
    assert not protocol.ping_outstanding
