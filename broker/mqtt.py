"""Blocking paho-mqtt connections over mutual TLS, for the services and operator commands."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class ConnectError(Exception):
    """Could not connect; the message says what the broker or the network answered."""


def tls_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Mutual TLS, 1.2 at least, server certificate and hostname verified against our CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def connect(
    host: str,
    port: int,
    *,
    context: ssl.SSLContext,
    client_id: str,
    clean_start: bool = True,
    session_expiry: int = 0,
    timeout: float = 10.0,
    on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None] | None = None,
    keepalive: int = 30,
) -> mqtt.Client:
    """Connect with MQTT 5 and start the network thread; raise ConnectError on refusal."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(context)
    # Replies published from worker threads must not wait behind an unacknowledged PUBACK for
    # the peer's delayed ACK (Nagle): that cost 40 ms per provisioning request. paho types the
    # socket as its minimal SocketLike; with tls_set_context (no websockets) it is an SSLSocket.
    client.on_socket_open = lambda _c, _u, sock: cast(ssl.SSLSocket, sock).setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
    )
    if on_message is not None:
        client.on_message = on_message
    done = threading.Event()
    outcome: dict[str, object] = {}

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        outcome["reason"] = reason
        done.set()

    client.on_connect = on_connect
    # paho's Properties has no annotations; --strict calls that an untyped call.
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry
    try:
        client.connect(host, port, keepalive, clean_start=clean_start, properties=properties)
    except ssl.SSLCertVerificationError as exc:
        hint = ""
        if exc.verify_code in (62, 64):  # OpenSSL: hostname / IP address mismatch
            hint = f"; to add the name: fleet-broker broker-cert --host {host}, then restart it"
        raise ConnectError(f"cannot connect to {host}:{port}: {exc}{hint}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from None
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise ConnectError(f"no CONNACK from {host}:{port} within {timeout:.0f} s")
    reason = outcome["reason"]
    if getattr(reason, "is_failure", False):
        client.loop_stop()
        raise ConnectError(f"{host}:{port} refused the connection: {reason}")
    return client


def disconnect(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()
