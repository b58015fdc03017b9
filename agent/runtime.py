"""The connected life of a provisioned device: connect, sync its shadows, reconnect, repeat.

`DeviceRuntime.run` connects with the device's own certificate (client id = thing name), and on
every connection subscribes once for all its shadows, then lets each `ShadowSync` get, apply and
report. When the connection ends it waits as `Backoff` says and starts again. Reporters (device
facts) run on start and on an interval whether connected or not: offline reports are queued on
disk and go out on the next connection.

A revoked certificate stops the runtime with `CertificateRevoked` (an expired one, refused by
the broker, with `CertificateExpired`) instead of retrying forever.

With a `Renewer`, a task on each connection waits until the certificate is due for renewal,
obtains and stages the new one over that connection, and ends it; the next connection is made
with the staged certificate, which is switched in once the broker accepts it (or discarded if
the broker refuses it, the old one kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import wire
from agent.reconnect import Backoff, Ending, FailureKind, ReconnectPolicy, ending
from agent.renewal import RenewalFailed, Renewer
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
from agent.shadow import Document, ReportQueueFull
from agent.shadow_rules import merge
from agent.shadow_sync import QueueNotSaved, ShadowRejected, ShadowSync

log = logging.getLogger("fleet.agent.runtime")


def presence(state: str, reason: str | None = None) -> bytes:
    """The retained status document on the thing's status topic."""
    document: dict[str, Any] = {"state": state, "timestamp": int(time.time())}
    if reason:
        document["reason"] = reason
    return wire.encode(document)


class CertificateUnusable(Exception):
    """The broker will not accept this certificate again: retrying cannot help."""


class CertificateRevoked(CertificateUnusable):
    """The broker says the device's certificate is revoked."""


class CertificateExpired(CertificateUnusable):
    """The broker refuses the certificate and it has expired: renewal came too late."""


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


def refuses_identity(error: SessionError) -> bool:
    """Does ``error`` say the broker will not take this certificate (revoked included)?"""
    try:
        return classify(error) == "identity"
    except CertificateRevoked:
        return True


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
        renewer: Renewer | None = None,
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
        self.renewer = renewer
        self._switching = False  # this connection ends to prove a renewed certificate
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
                staged = self.renewer.staged() if self.renewer else None
                try:
                    session = await connect(
                        self.settings.endpoint,
                        self.settings.port,
                        client_id=self.settings.thing,
                        context=(
                            tls_context(self.settings.ca_file, staged.cert_path, staged.key_path)
                            if staged
                            else self._context_factory()
                        ),
                        timeout=self.settings.timeout,
                        keepalive=self.settings.keepalive,
                        will=Will(
                            self._status_topic, presence("offline", "connection lost"), 1, True
                        ),
                    )
                except SessionError as exc:
                    self.last_error = str(exc)
                    if staged is not None and self.renewer and refuses_identity(exc):
                        self.renewer.refused(str(exc))
                        continue  # straight back with the old certificate
                    kind = classify(exc)
                    if kind == "identity":
                        log.error("the broker refused this device's certificate: %s", exc)
                        self._raise_if_expired(exc)
                    else:
                        log.warning("cannot connect: %s", exc)
                    await self._pause(self.backoff.failed(kind), stop)
                    continue
                if staged is not None and self.renewer:
                    await self._switch_to_renewed()
                started = time.monotonic()
                how = await self._connected(session, stop)
                if stop.is_set():
                    break
                if self._switching:
                    self._switching = False
                    continue  # reconnect at once, with the staged certificate
                ended = self.backoff.connection_ended(time.monotonic() - started, how)
                if how == "lost" and session.disconnect_code == ADMINISTRATIVE_ACTION:
                    # Kicked, perhaps because the certificate was just revoked: the next
                    # handshake says so; wait the ordinary short time to find out.
                    log.warning("the broker's operator ended the connection")
                elif ended == "identity":
                    log.error(
                        "the broker refused this device's connection (%s); waiting longer "
                        "before trying again",
                        session.disconnect_reason,
                    )
                await self._pause(self.backoff.failed(ended or "transient"), stop)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self.state = "stopped"

    def _raise_if_expired(self, error: SessionError) -> None:
        """Refused, and past its notAfter by this device's clock: renewal came too late."""
        if self.renewer is None:
            return
        try:
            expired_at = self.renewer.certificate().not_valid_after_utc
        except Exception:  # unreadable: the next start says why
            return
        if expired_at < dt.datetime.now(dt.timezone.utc):
            last = self.renewer.last_error
            raise CertificateExpired(
                f"the broker refused the device certificate ({error}) and it expired at "
                f"{expired_at.isoformat()}"
                + (f"; the last renewal attempt failed: {last}" if last else "")
            )

    async def _switch_to_renewed(self) -> None:
        assert self.renewer is not None
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.renewer.proven)
        except OSError as exc:
            # The new certificate works; the switch is retried from the staged files on the
            # next connection (or the next start).
            log.error("connected with the renewed certificate but could not switch to it: %s", exc)

    async def _renew_when_due(self, session: Session) -> None:
        """Returns once a renewed certificate is staged: the connection is then ended."""
        assert self.renewer is not None
        while True:
            await self.renewer.wait_due()
            try:
                await self.renewer.renew(session)
            except RenewalFailed:
                continue  # the renewer scheduled the retry
            return

    async def report(self, shadow: str | None, patch: Mapping[str, Any]) -> bool:
        return await self.sync(shadow).report(patch)

    def status(self) -> dict[str, Any]:
        certificate: dict[str, Any] | None = None
        if self.renewer is not None:
            with contextlib.suppress(Exception):
                certificate = self.renewer.status()
        return {
            "certificate": certificate,
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

    async def _connected(self, session: Session, stop: asyncio.Event) -> Ending:
        """Serve the shadows over ``session`` until it ends; how it ended."""
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
            renewal = asyncio.create_task(self._renew_when_due(session)) if self.renewer else None
            closed = asyncio.create_task(session.wait_closed())
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                [closed, stopping, *tasks, *([renewal] if renewal else [])],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in (closed, stopping, renewal):
                if task is not None:
                    task.cancel()
            if renewal in done and not renewal.cancelled() and renewal.exception() is None:
                self._switching = True
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
            # Who ended it, before our own DISCONNECT below makes every connection look closed.
            how = ending(not session.closed, session.disconnect_code)
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
        return how

    async def _report_ticker(self, stop: asyncio.Event) -> None:
        """Device facts and the handlers' retries, every ``report_interval``. Nothing ends it
        but ``stop``: a tick that fails (the state folder full or read-only, say) is logged
        and the next one tries again."""
        while not stop.is_set():
            try:
                await self._tick()
            except Exception:  # a bug: say so, and keep ticking
                log.exception("report tick failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.report_interval)

    async def _tick(self) -> None:
        if self.reporters:
            facts = self.collect_facts()
            if facts:
                try:
                    await self.facts_shadow.report(facts)
                except ReportQueueFull as exc:
                    log.warning("device facts not reported: %s", exc)  # fresh ones next tick
                except QueueNotSaved as exc:
                    log.warning("device facts not saved: %s", exc)  # sent all the same
        for sync in self.syncs.values():
            sync.retry_failed()
