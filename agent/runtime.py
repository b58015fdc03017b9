"""The connected life of a provisioned device: connect, sync its shadows, reconnect, repeat.

`DeviceRuntime.run` connects with the device's own certificate (client id = thing name), and on
every connection subscribes once for all its shadows, then lets each `ShadowSync` get, apply and
report. When the connection ends it waits as `Backoff` says and starts again. Reporters (device
facts) run on start and on an interval whether connected or not: offline reports are queued on
disk and go out on the next connection.

A revoked certificate stops the runtime with `CertificateRevoked` instead of retrying forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import wire
from agent.reconnect import Backoff, FailureKind, ReconnectPolicy
from agent.reporters import Reporter
from agent.session import (
    ADMINISTRATIVE_ACTION,
    ConnectRefused,
    Session,
    SessionError,
    TlsFailure,
    Will,
    connect,
    tls_context,
)
from agent.shadow import Document, merge
from agent.shadow_sync import ShadowRejected, ShadowSync

log = logging.getLogger("fleet.agent.runtime")


def presence(state: str, reason: str | None = None) -> bytes:
    """The retained status document on the thing's status topic."""
    document: dict[str, Any] = {"state": state, "timestamp": int(time.time())}
    if reason:
        document["reason"] = reason
    return wire.encode(document)


class CertificateRevoked(Exception):
    """The broker says the device's certificate is revoked: retrying cannot help."""


@dataclass(frozen=True)
class RuntimeSettings:
    endpoint: str
    port: int
    ca_file: Path
    thing: str
    cert_file: Path
    key_file: Path
    report_interval: float = 300.0
    timeout: float = 10.0
    keepalive: int = 60
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)


def classify(error: SessionError) -> FailureKind:
    """How a failed connect counts for the backoff; raises CertificateRevoked."""
    text = str(error).lower()
    if isinstance(error, TlsFailure) and "revoked" in text:
        raise CertificateRevoked(f"the broker refused the device certificate as revoked: {error}")
    if (isinstance(error, ConnectRefused) and error.identity_refused) or (
        isinstance(error, TlsFailure) and error.peer_refused
    ):
        return "identity"
    return "transient"


class DeviceRuntime:
    def __init__(
        self,
        settings: RuntimeSettings,
        syncs: Sequence[ShadowSync],
        reporters: Sequence[Reporter] = (),
        *,
        context_factory: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        if not syncs:
            raise ValueError("a runtime needs at least one shadow to sync")
        self.settings = settings
        self.syncs = {sync.shadow: sync for sync in syncs}
        self.reporters = list(reporters)
        self._context_factory = context_factory or (
            lambda: tls_context(settings.ca_file, settings.cert_file, settings.key_file)
        )
        self.backoff = Backoff(settings.reconnect)
        self.session: Session | None = None
        self.state = "starting"
        self.connected_since: float | None = None
        self.connections = 0
        self.last_error: str | None = None
        self.next_attempt: float | None = None
        self._status_topic = wire.status_topic(settings.thing)

    # ---------------------------------------------------------------- public

    @property
    def facts_shadow(self) -> ShadowSync:
        """Device facts go to the classic shadow, or the first one synced."""
        return self.syncs.get(None) or next(iter(self.syncs.values()))

    def sync(self, shadow: str | None) -> ShadowSync:
        try:
            return self.syncs[shadow]
        except KeyError:
            known = ", ".join(s.name for s in self.syncs.values())
            raise KeyError(
                f"this agent does not sync shadow {shadow or 'classic'} ({known})"
            ) from None

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set. Raises CertificateRevoked."""
        ticker = asyncio.create_task(self._report_ticker(stop))
        try:
            while not stop.is_set():
                self.state = "connecting"
                try:
                    session = await connect(
                        self.settings.endpoint,
                        self.settings.port,
                        client_id=self.settings.thing,
                        context=self._context_factory(),
                        timeout=self.settings.timeout,
                        keepalive=self.settings.keepalive,
                        will=Will(
                            self._status_topic, presence("offline", "connection lost"), 1, True
                        ),
                    )
                except SessionError as exc:
                    kind = classify(exc)
                    self.last_error = str(exc)
                    if kind == "identity":
                        log.error("the broker refused this device's certificate: %s", exc)
                    else:
                        log.warning("cannot connect: %s", exc)
                    await self._pause(self.backoff.failed(kind), stop)
                    continue
                started = time.monotonic()
                await self._connected(session, stop)
                if stop.is_set():
                    break
                kind = self.backoff.connection_ended(time.monotonic() - started)
                if session.disconnect_code == ADMINISTRATIVE_ACTION:
                    # Kicked, perhaps because the certificate was just revoked: the next
                    # handshake says so; wait the ordinary short time to find out.
                    log.warning("the broker's operator ended the connection")
                    kind = "transient"
                elif kind == "identity":
                    log.error(
                        "the broker closed the connection right after accepting it (%s): "
                        "treating it as a refusal of this certificate",
                        session.disconnect_reason,
                    )
                await self._pause(self.backoff.failed(kind or "transient"), stop)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self.state = "stopped"

    async def report(self, shadow: str | None, patch: Mapping[str, Any]) -> bool:
        return await self.sync(shadow).report(patch)

    def status(self) -> dict[str, Any]:
        return {
            "thing": self.settings.thing,
            "state": self.state,
            "connected_since": self.connected_since,
            "connections": self.connections,
            "last_error": self.last_error,
            "next_attempt": self.next_attempt,
            "shadows": {
                sync.name: {
                    "version": sync.tracker.version,
                    "last_sync": sync.last_sync,
                    "queued_reports": len(sync.queue.patches),
                    "delta": sync.tracker.delta,
                }
                for sync in self.syncs.values()
            },
        }

    def collect_facts(self) -> Document:
        facts: Document = {}
        for reporter in self.reporters:
            try:
                facts = merge(facts, reporter())
            except Exception:
                log.exception("reporter %s failed", getattr(reporter, "__name__", reporter))
        return facts

    # ------------------------------------------------------------- internals

    async def _pause(self, delay: float, stop: asyncio.Event) -> None:
        self.state = "waiting"
        self.next_attempt = time.time() + delay
        log.info("next connection attempt in %.1f s", delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        self.next_attempt = None

    async def _connected(self, session: Session, stop: asyncio.Event) -> None:
        self.session = session
        self.connections += 1
        tasks: list[asyncio.Task[Any]] = []
        try:
            for sync in self.syncs.values():
                sync.attach(session)
            topics = [t for sync in self.syncs.values() for t in sync.subscriptions()]
            await session.subscribe(*topics, timeout=self.settings.timeout)
            await session.publish(
                self._status_topic, presence("online"), retain=True, timeout=self.settings.timeout
            )
            self.state = "connected"
            self.connected_since = time.time()
            self.last_error = None
            log.info("connected to %s as %s", session.where, self.settings.thing)
            tasks = [asyncio.create_task(sync.serve(session)) for sync in self.syncs.values()]
            closed = asyncio.create_task(session.wait_closed())
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                [closed, stopping, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            for task in (closed, stopping):
                task.cancel()
            for task in tasks:
                if task in done and not task.cancelled() and task.exception() is not None:
                    self.last_error = str(task.exception())
                    log.error("shadow sync stopped: %s", task.exception())
            if closed in done:
                self.last_error = f"connection lost: {session.disconnect_reason}"
                log.warning("connection to %s lost (%s)", session.where, session.disconnect_reason)
        except (SessionError, ShadowRejected) as exc:
            self.last_error = str(exc)
            log.warning("connection setup failed: %s", exc)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:  # bounded: a handler that ignores cancellation cannot hold us here
                await asyncio.wait(tasks, timeout=self.settings.timeout)
            self.session = None
            self.connected_since = None
            if stop.is_set() and not session.closed:
                # A clean DISCONNECT suppresses the Will: say "offline" ourselves.
                with contextlib.suppress(SessionError):
                    await session.publish(
                        self._status_topic, presence("offline", "stopped"), retain=True, timeout=2
                    )
            await session.disconnect()

    async def _report_ticker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.reporters:
                facts = self.collect_facts()
                if facts:
                    await self.facts_shadow.report(facts)
            for sync in self.syncs.values():
                sync.retry_failed()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.report_interval)
