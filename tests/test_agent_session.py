"""agent.session against real Mosquitto (with the plugin, without the fleet services) and real
TLS servers: each failure stage gets its own error, and the asyncio plumbing holds up."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from agent import wire
from agent.keystore import generate_key
from agent.onboarding import run_claim_flow
from agent.provisioning import ClaimFlow, RetryPolicy, build_csr, create_certificate_request
from agent.runtime import classify
from agent.session import (
    BrokerUnreachable,
    ConnectionLost,
    ConnectRefused,
    Message,
    Session,
    SessionTimeout,
    SubscribeRefused,
    TlsFailure,
    connect,
    tls_context,
)
from broker.pki import CertificateAuthority
from broker.registry import CertificateRole
from tests.fleet import Credentials, Fleet, agent_config, free_port, run_agent, running_fleet

pytestmark = pytest.mark.stack

T = TypeVar("T")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """The broker and its plugin; nobody answers provisioning requests."""
    with running_fleet(services=False) as running:
        yield running


def run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(factory())  # type: ignore[arg-type]


async def open_session(fleet: Fleet, creds: Credentials, client_id: str, **kw: object) -> Session:
    return await connect(
        fleet.config.connect_host,
        fleet.config.port,
        client_id=client_id,
        ca=fleet.pki.ca_cert,
        cert=creds.cert,
        key=creds.key,
        **kw,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------- connect


def test_connect_subscribe_publish_receive(fleet: Fleet) -> None:
    creds = fleet.device("session-thing")
    service = fleet.as_service()

    async def scenario() -> Message:
        session = await open_session(fleet, creds, "session-thing")
        got: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        session.handler = lambda m: got.done() or got.set_result(m)
        codes = await session.subscribe(wire.shadow_delta("session-thing"))
        assert codes == [1]
        await session.publish(wire.shadow_topic("session-thing", "update"), b"{}")  # PUBACK
        service.publish(wire.shadow_delta("session-thing"), b'{"state":{"on":true}}')
        message = await asyncio.wait_for(got, 5)
        await session.disconnect()
        assert session.closed
        return message

    message = run(scenario)
    assert message.topic == wire.shadow_delta("session-thing")
    assert message.payload == b'{"state":{"on":true}}'


def test_receiving_makes_no_cyclic_garbage(fleet: Fleet) -> None:
    """A fleet of sessions must not feed the garbage collector per message: its pauses grow
    with the number of sessions in the process (they stalled fleet-sim's loop ~100 ms)."""
    creds = fleet.device("garbage-free")
    service = fleet.as_service()
    topic = wire.shadow_delta("garbage-free")

    async def scenario() -> int:
        session = await open_session(fleet, creds, "garbage-free")
        received: list[Message] = []
        enough = asyncio.Event()

        def on_message(message: Message) -> None:
            received.append(message)
            if len(received) == 50:
                enough.set()

        session.handler = on_message
        await session.subscribe(topic)
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                service.publish(topic, b'{"state":{"on":true}}', qos=0)
            await asyncio.wait_for(enough.wait(), 10)
            garbage = gc.collect()
        finally:
            gc.enable()
        await session.disconnect()
        return garbage

    assert run(scenario) < 10  # not one cycle per message


def test_unreachable_port(fleet: Fleet) -> None:
    port = free_port()

    async def scenario() -> None:
        await connect(
            "127.0.0.1",
            port,
            client_id="x",
            ca=fleet.pki.ca_cert,
            cert=fleet.claim.cert,
            key=fleet.claim.key,
        )

    with pytest.raises(BrokerUnreachable, match=f"127.0.0.1:{port}: Connection refused"):
        run(scenario)


def test_claim_refused_at_connack(fleet: Fleet) -> None:
    fleet.device("taken-name")

    async def scenario() -> None:
        # A claim may not use a registered thing's name as its client id: the plugin says 0x87.
        await open_session(fleet, fleet.claim, "taken-name")

    with pytest.raises(ConnectRefused) as raised:
        run(scenario)
    assert raised.value.reason_code == 0x87 and raised.value.identity_refused
    assert "Not authorized (0x87)" in str(raised.value)


def test_certificate_of_a_foreign_ca_is_refused_in_tls(fleet: Fleet) -> None:
    foreign = fleet.identity(
        CertificateRole.DEVICE, ca=CertificateAuthority.create(days=1), register=False
    )
    with pytest.raises(TlsFailure) as raised:
        run(lambda: open_session(fleet, foreign, "foreign"))
    assert raised.value.peer_refused
    assert "unknown ca" in str(raised.value)


def test_untrusted_broker(fleet: Fleet) -> None:
    async def scenario() -> None:
        await connect(
            fleet.config.connect_host,
            fleet.config.port,
            client_id="x",
            ca=fleet.claim.cert,  # not the CA that signed the broker
            cert=fleet.claim.cert,
            key=fleet.claim.key,
        )

    with pytest.raises(TlsFailure, match="is not trusted") as raised:
        run(scenario)
    assert not raised.value.peer_refused


async def claim_connect(fleet: Fleet, host: str, port: int, **kw: object) -> Session:
    """The claim identity to a test server of ours (not the fleet's broker)."""
    return await connect(
        host,
        port,
        client_id="x",
        ca=fleet.pki.ca_cert,
        cert=fleet.claim.cert,
        key=fleet.claim.key,
        **kw,  # type: ignore[arg-type]
    )


class SilentTlsServer:
    """A TLS server with the broker's own certificate that never speaks MQTT."""

    def __init__(self, fleet: Fleet, host: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(fleet.pki.broker_cert), str(fleet.pki.broker_key))
        self.host = host
        self.port = free_port()
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentTlsServer:
        async def hold(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)

        self.server = await asyncio.start_server(
            hold, self.host, self.port, ssl=self.context, reuse_address=True
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()


def test_hostname_verification_is_on(fleet: Fleet) -> None:
    # The broker certificate names localhost, 127.0.0.1 and ::1, not 127.0.0.2.
    async def scenario() -> None:
        async with SilentTlsServer(fleet, "127.0.0.2") as server:
            await claim_connect(fleet, "127.0.0.2", server.port)

    with pytest.raises(TlsFailure, match="mismatch"):
        run(scenario)


def test_no_connack_is_a_timeout(fleet: Fleet) -> None:
    async def scenario() -> None:
        async with SilentTlsServer(fleet, "127.0.0.1") as server:
            await claim_connect(fleet, "127.0.0.1", server.port, timeout=0.5)

    with pytest.raises(SessionTimeout, match="no CONNACK"):
        run(scenario)


class ResettingServer:
    """Accepts, lets the TLS handshake run until ``after`` ("hello": its first message;
    "connect": a finished handshake and the MQTT CONNECT), then resets the TCP connection,
    sending no alert: what a broker that is stopping or starting does."""

    def __init__(self, fleet: Fleet, after: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(fleet.pki.broker_cert), str(fleet.pki.broker_key))
        self.after = after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        try:
            if self.after == "hello":
                conn.recv(4096)
            else:
                conn = self.context.wrap_socket(conn, server_side=True)
                conn.recv(4096)
            # Linger 0: close() sends a RST instead of the TLS close_notify and FIN.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            conn.close()
            self.listener.close()


@pytest.mark.parametrize("after", ["hello", "connect"])
def test_a_reset_without_an_alert_is_not_a_refusal_of_the_certificate(
    fleet: Fleet, after: str
) -> None:
    """A broker going down resets connections in the middle of their handshake; that must not
    send the agent into the 60-900 s wait for a refused certificate (found by the faults
    test that restarts the broker twice)."""
    server = ResettingServer(fleet, after)

    async def scenario() -> None:
        await claim_connect(fleet, "127.0.0.1", server.port, timeout=5)

    with pytest.raises((TlsFailure, ConnectionLost)) as raised:
        run(scenario)
    server.thread.join(5)
    assert not getattr(raised.value, "peer_refused", False), raised.value
    assert classify(raised.value) == "transient", raised.value


# --------------------------------------------------------------- subscribe / request


def test_refused_subscription_raises_and_the_session_lives_on(fleet: Fleet) -> None:
    async def scenario() -> list[int]:
        session = await open_session(fleet, fleet.claim, "claim-subscribe")
        try:
            with pytest.raises(SubscribeRefused) as raised:
                await session.subscribe(wire.shadow_delta("someone-else"))
            assert raised.value.reason_code == 0x87
            assert "someone-else" in str(raised.value)
            return await session.subscribe(
                wire.reply(wire.create_certificate_from_csr(), "accepted")
            )
        finally:
            await session.disconnect()

    assert run(scenario) == [1]


def test_request_without_a_responder_times_out(fleet: Fleet) -> None:
    request = create_certificate_request(build_csr(generate_key()))

    async def scenario() -> None:
        session = await open_session(fleet, fleet.claim, "claim-timeout")
        try:
            await session.request(request.topic, request.payload, request.reply_topics, 0.5)
        finally:
            await session.disconnect()

    with pytest.raises(SessionTimeout, match=r"no reply to \$aws/certificates/create-from-csr"):
        run(scenario)


def test_timeouts_are_retried_with_backoff_then_reported(fleet: Fleet) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def scenario() -> None:
        session = await open_session(fleet, fleet.claim, "claim-retry")
        try:
            await run_claim_flow(
                session,
                ClaimFlow(generate_key()),
                timeout=0.3,
                retry=RetryPolicy(max_attempts=3, base_delay=0.01),
                sleep=sleep,
            )
        finally:
            await session.disconnect()

    with pytest.raises(SessionTimeout):
        run(scenario)
    assert len(slept) == 2 and all(0 <= s <= 0.02 for s in slept)


def test_a_kicked_session_fails_its_waiters_at_once(fleet: Fleet) -> None:
    creds = fleet.device("kicked-thing")
    service = fleet.as_service()

    async def scenario() -> None:
        session = await open_session(fleet, creds, "kicked-thing")
        get = wire.shadow_topic("kicked-thing", "get")
        waiting = asyncio.ensure_future(
            session.request(
                get, b"{}", [wire.reply(get, "accepted"), wire.reply(get, "rejected")], 30
            )
        )
        await asyncio.sleep(0.3)
        service.publish(wire.CONTROL_TOPIC, f"kick-certificate {creds.certificate_id}")
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(waiting, 5)
        assert session.closed
        with pytest.raises(ConnectionLost):
            await session.publish(get, b"{}")

    run(scenario)


def test_one_context_serves_many_sessions(fleet: Fleet) -> None:
    context = tls_context(fleet.pki.ca_cert, fleet.claim.cert, fleet.claim.key)

    async def scenario() -> int:
        sessions = await asyncio.gather(
            *(
                connect(
                    fleet.config.connect_host,
                    fleet.config.port,
                    client_id=f"claim-many-{i}",
                    context=context,
                )
                for i in range(20)
            )
        )
        await asyncio.gather(*(s.disconnect() for s in sessions))
        return sum(s.closed for s in sessions)

    assert run(scenario) == 20


# ------------------------------------------------------------------ the CLI, timing out


def test_cli_reports_a_timeout_when_nobody_answers(fleet: Fleet, tmp_path: Path) -> None:
    config = agent_config(
        fleet, None, provisioning="timeout = 0.5\nmax_attempts = 2", state=tmp_path / "state"
    )
    proc = run_agent(config)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("fleet-agent: timeout: no reply to $aws/certificates/create-from-csr")


def test_a_broker_certificate_without_the_endpoint_name_says_how_to_add_it(fleet: Fleet) -> None:
    async def scenario() -> None:
        async with SilentTlsServer(fleet, "127.0.0.2") as server:  # a name the cert lacks
            await connect(
                "127.0.0.2",
                server.port,
                client_id="x",
                ca=fleet.pki.ca_cert,
                cert=fleet.claim.cert,
                key=fleet.claim.key,
                timeout=3,
            )

    with pytest.raises(TlsFailure, match="is not trusted") as raised:
        run(scenario)
    assert "fleet-broker broker-cert --host NAME" in str(raised.value)


def test_a_port_that_does_not_speak_tls_is_named_as_such() -> None:
    async def scenario() -> None:
        async def hello(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # plain TCP: not TLS
            await writer.drain()

        server = await asyncio.start_server(hello, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            context = ssl.create_default_context()
            await connect("127.0.0.1", port, client_id="x", context=context, timeout=3)
        finally:
            server.close()

    with pytest.raises(TlsFailure, match="a TLS port"):
        run(scenario)
