"""One simulated device running the real agent code, with every step timed.

claim connect -> SUBACK -> CreateCertificateFromCsr -> RegisterThing (agent.provisioning's
`ClaimFlow` over agent.session) -> connect with its own new certificate -> shadow sync
(agent.shadow_sync's `ShadowSync`: get, apply desired through a handler, report) -> a shadow
update every interval, measured from publish to `/update/accepted`.

The key is made here and never leaves the process. Every device of a process connects through
one shared TLS context, loaded with the device's own key and certificate for each of its
connections (simulator/shared_tls.py): a context per device was a third of its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization

from agent.handlers import DesiredChange, HandlerSet
from agent.keystore import generate_key
from agent.provisioning import (
    ClaimFlow,
    ProtocolViolation,
    ProvisioningRejected,
    ProvisioningResult,
    Request,
)
from agent.session import (
    BrokerUnreachable,
    ConnectionLost,
    ConnectRefused,
    Session,
    SessionError,
    SessionTimeout,
    TlsFailure,
    TlsSource,
    connect,
)
from agent.shadow_sync import MemoryQueueStore, ShadowSync
from simulator import shared_tls

SENT_AT_KEY = "sim_sent_at"  # desired key the operator side stamps with its wall clock


class Recorder(Protocol):
    def observe(self, step: str, seconds: float, at: float | None = None) -> None: ...

    def error(
        self, step: str, kind: str, at: float | None = None, message: str | None = None
    ) -> None: ...


@dataclass(frozen=True)
class Target:
    """Where the fleet connects and how it onboards."""

    endpoint: str
    port: int
    ca_file: Path
    template: str = "fleet-default"
    timeout: float = 30.0
    keepalive: int = 300


@dataclass
class Counters:
    """Per process: how many devices are where right now."""

    connected: int = 0
    onboarded: int = 0
    failed: int = 0
    things: list[str] = field(default_factory=list)


def error_kind(exc: BaseException) -> str:
    """A short label for the report: what kind of failure, never a secret."""
    if isinstance(exc, ProvisioningRejected):
        return exc.error_code
    if isinstance(exc, SessionTimeout):
        return "timeout"
    if isinstance(exc, ConnectRefused):
        return f"CONNACK {exc.reason}"
    if isinstance(exc, TlsFailure):
        return "TLS refused" if exc.peer_refused else "TLS failure"
    if isinstance(exc, BrokerUnreachable):
        return "unreachable"
    if isinstance(exc, ConnectionLost):
        return "connection lost"
    if isinstance(exc, ProtocolViolation):
        return "protocol violation"
    return type(exc).__name__


class VirtualDevice:
    def __init__(
        self,
        serial: str,
        target: Target,
        claim_context: ssl.SSLContext,
        recorder: Recorder,
        counters: Counters,
        *,
        parameters: dict[str, str] | None = None,
    ) -> None:
        self.serial = serial
        self.target = target
        self.claim_context = claim_context
        self.recorder = recorder
        self.counters = counters
        self.parameters = {"SerialNumber": serial, **(parameters or {})}
        self.thing: str | None = None
        self.context: TlsSource | None = None  # its own identity, on the shared context
        self.session: Session | None = None
        self.sync: ShadowSync | None = None
        self._serve: asyncio.Task[None] | None = None
        self._sequence = 0

    # ----------------------------------------------------------------- onboarding

    async def _connect(self, client_id: str, context: TlsSource) -> Session:
        timings: dict[str, float] = {}
        try:
            session = await connect(
                self.target.endpoint,
                self.target.port,
                client_id=client_id,
                context=context,
                timeout=self.target.timeout,
                keepalive=self.target.keepalive,
                timings=timings,
            )
        except SessionError as exc:
            self.recorder.error("connect", error_kind(exc), message=str(exc))
            raise
        for step, seconds in timings.items():
            self.recorder.observe(step, seconds)
        return session

    async def _timed_request(self, session: Session, step: str, request: Request) -> Any:
        started = time.perf_counter()
        reply = await session.request(
            request.topic, request.payload, request.reply_topics, self.target.timeout
        )
        self.recorder.observe(step, time.perf_counter() - started)
        return reply

    async def onboard(self) -> None:
        """The claim flow, then the first connection as the thing. Raises on failure (the
        failure is recorded by kind first)."""
        started = time.perf_counter()
        key = generate_key()
        flow = ClaimFlow(key, template=self.target.template, parameters=self.parameters)
        claim = await self._connect(f"claim-{self.serial}", self.claim_context)
        try:
            step = "suback"
            began = time.perf_counter()
            await claim.subscribe(*flow.reply_topics(), timeout=self.target.timeout)
            self.recorder.observe(step, time.perf_counter() - began)
            step = "create_certificate"
            reply = await self._timed_request(claim, step, flow.start())
            register = flow.receive(reply.topic, reply.payload)
            assert isinstance(register, Request)
            step = "register_thing"
            reply = await self._timed_request(claim, step, register)
            result = flow.receive(reply.topic, reply.payload)
            assert isinstance(result, ProvisioningResult)
        except (SessionError, ProvisioningRejected, ProtocolViolation) as exc:
            self.recorder.error(step, error_kind(exc), message=str(exc))
            raise
        finally:
            await claim.disconnect()
        self.thing = result.thing_name
        self.context = shared_tls.identity(
            self.target.ca_file,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            result.certificate_pem.encode(),
        )
        await self.go_online()
        self.recorder.observe("onboarding", time.perf_counter() - started)
        self.counters.onboarded += 1
        self.counters.things.append(result.thing_name)

    # ------------------------------------------------------------------ online

    async def go_online(self) -> None:
        """Connect as the thing, subscribe for its shadow and start syncing it."""
        assert self.thing is not None and self.context is not None
        session = await self._connect(self.thing, self.context)
        if self.sync is None:
            handlers = HandlerSet("echo")
            handlers.register(self._apply_desired, name="simulated device")
            self.sync = ShadowSync(
                self.thing,
                None,
                handlers,
                MemoryQueueStore(),
                timeout=self.target.timeout,
                store_in_executor=False,
            )
        self.sync.attach(session)
        try:
            began = time.perf_counter()
            await session.subscribe(*self.sync.subscriptions(), timeout=self.target.timeout)
            self.recorder.observe("suback", time.perf_counter() - began)
        except SessionError as exc:
            self.recorder.error("suback", error_kind(exc), message=str(exc))
            session.abort()
            raise
        self.session = session
        self.counters.connected += 1
        self._serve = asyncio.create_task(self._serve_until_closed(session))

    async def _serve_until_closed(self, session: Session) -> None:
        assert self.sync is not None
        try:
            await self.sync.serve(session)
        except SessionError:
            pass
        except Exception as exc:  # a shadow rejection: counted, the device goes on
            self.recorder.error("shadow_sync", error_kind(exc), message=str(exc))

    def _apply_desired(self, change: DesiredChange) -> dict[str, Any]:
        sent_at = change.delta.get(SENT_AT_KEY)
        if isinstance(sent_at, int | float):
            self.recorder.observe("delta_delivery", max(0.0, time.time() - sent_at))
        return dict(change.delta)  # the simulated device reaches what was asked

    async def update(self, size: int) -> None:
        """One shadow update, timed from publish to /update/accepted."""
        if self.sync is None or self.session is None or self.session.closed:
            return
        self._sequence += 1
        patch = {"sim": {"seq": self._sequence, "pad": "x" * size}}
        started = time.perf_counter()
        try:
            await self.sync.report(patch)
            sent = await self.sync.wait_sent(self.target.timeout)
        except Exception as exc:
            self.recorder.error("shadow_update", error_kind(exc), message=str(exc))
            return
        if sent:
            self.recorder.observe("shadow_update", time.perf_counter() - started)
        else:
            self.recorder.error("shadow_update", "timeout")

    async def drop(self) -> None:
        """Lose the connection as a network failure would (no DISCONNECT: the Will fires)."""
        session = self.session
        self.session = None
        if session is None:
            return
        self.counters.connected -= 1
        session.abort()
        if self._serve is not None:
            self._serve.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._serve

    async def reconnect(self) -> None:
        started = time.perf_counter()
        await self.go_online()
        self.recorder.observe("reconnect", time.perf_counter() - started)

    async def close(self) -> None:
        session = self.session
        self.session = None
        if session is not None:
            self.counters.connected -= 1
            with contextlib.suppress(Exception):
                await session.disconnect(timeout=2)
        if self._serve is not None:
            self._serve.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._serve


def jittered(interval: float) -> float:
    """A first delay spread over one interval, so a fleet does not update in step."""
    return random.uniform(0, interval)
