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

The protocol itself (packets, the session's state) is `broker.mqtt5_client.ClientProtocol`,
sans-IO; this module is its driver: the TLS socket, the thread, select() and the clock.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from broker.mqtt import ConnectError
from broker.mqtt5_client import (
    ClientProtocol,
    Inbound,
    ProtocolError,
    Refused,
    split_packet,
)

__all__ = ["BatchCallback", "Inbound", "ServiceConnection"]

log = logging.getLogger("fleet.mqtt")

_WRITE_CHUNK = 65536

BatchCallback = Callable[[list[Inbound]], None]


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
        self._on_batch = on_batch
        self._batch_limit = batch_limit
        self._reconnect_delay = reconnect_delay
        self._protocol = ClientProtocol(
            client_id,
            session_expiry=session_expiry,
            keepalive=keepalive,
            receive_maximum=receive_maximum,
        )
        self._sock: ssl.SSLSocket | None = None
        self._in = bytearray()
        self._last_out = 0.0
        self._ping_sent = 0.0  # when the outstanding PINGREQ went (protocol.ping_outstanding)
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
        self._protocol.publish(topic, payload, user_properties)
        if threading.current_thread() is not self._thread:
            self._wake()

    def depths(self) -> dict[str, int]:
        """How much is waiting here right now (read from any thread: lengths only)."""
        protocol = self._protocol
        return {
            "requests_waiting": len(protocol.held),
            "replies_queued": len(protocol.queued),
            "replies_in_flight": len(protocol.inflight),
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
        protocol = self._protocol
        try:
            sock.sendall(protocol.connect())
            header, body, rest = self._read_packet_blocking(sock)
        except (OSError, ssl.SSLError, ProtocolError) as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise ConnectError(f"no CONNACK from {where} within {timeout:.0f} s") from None
            raise ConnectError(f"cannot connect to {where}: {exc}") from None
        try:
            protocol.on_connack(header, body)
        except (Refused, ProtocolError) as exc:
            sock.close()
            raise ConnectError(f"{where} {exc}") from None
        sock.setblocking(False)
        self._sock = sock
        self._in[:] = rest  # what the broker sent right after CONNACK
        self._last_out = time.monotonic()

    @staticmethod
    def _read_packet_blocking(sock: ssl.SSLSocket) -> tuple[int, bytes, bytes]:
        """The first packet's type byte and body, and whatever came after it."""
        data = bytearray()
        while (found := split_packet(data)) is None:
            chunk = sock.recv(4096)
            if not chunk:
                raise ProtocolError("the broker closed the connection")
            data += chunk
        start, end = found
        return data[0], bytes(data[start:end]), bytes(data[end:])

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
        protocol = self._protocol
        out = protocol.data_to_send()
        readers = [sock, self._wake_r]
        self._receive(sock)  # bytes already inside the TLS layer are invisible to select()
        while not self._stopping.is_set():
            protocol.fill_window()
            self._keep_alive()
            if out:
                self._flush(sock)
            backlog = len(protocol.queued) >= protocol.window
            timeout: float | None = None
            keepalive = protocol.keepalive
            if protocol.held and not backlog:
                timeout = 0.0  # look for PUBACKs, then hand over the next batch
            elif keepalive:
                if protocol.ping_outstanding:
                    due = self._ping_sent + keepalive
                else:
                    due = self._last_out + keepalive / 2
                timeout = max(0.0, due - time.monotonic())
            readable, _, _ = select.select(readers, [sock] if out else [], [], timeout)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            if sock in readable:
                self._receive(sock)
            if protocol.held and len(protocol.queued) < protocol.window:
                self._dispatch()
        self._goodbye(sock)

    def _goodbye(self, sock: ssl.SSLSocket) -> None:
        self._protocol.disconnect()
        out = self._protocol.data_to_send()
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.settimeout(2.0)
            sock.sendall(out)
        out.clear()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def _keep_alive(self) -> None:
        keepalive = self._protocol.keepalive
        if not keepalive:
            return
        now = time.monotonic()
        if self._protocol.ping_outstanding:
            if now - self._ping_sent > keepalive:
                raise ConnectionError(f"no PINGRESP within {keepalive} s")
        elif now - self._last_out >= keepalive / 2:
            self._protocol.ping()
            self._ping_sent = now

    # ---------------------------------------------------------------- writing

    def _flush(self, sock: ssl.SSLSocket) -> None:
        out = self._protocol.data_to_send()
        while out:
            try:
                sent = sock.send(out[:_WRITE_CHUNK])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return  # select() tells when the socket takes more
            self._protocol.sent(sent)
            self._last_out = time.monotonic()

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
        self._protocol.receive(self._in)
        if closed:  # after reading what came before it (a DISCONNECT says why)
            raise ConnectionError("the broker closed the connection")

    def _dispatch(self) -> None:
        """Hand over the next batch; acknowledge it once the callback returned."""
        batch = self._protocol.take_batch(self._batch_limit)
        try:
            self._on_batch(batch)
        except Exception:  # the callback's bug must not take the connection down
            log.exception("handling %d message(s) failed", len(batch))
        self._protocol.acknowledge(batch)
