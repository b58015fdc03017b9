"""One shadow kept in sync over whatever session is current: the I/O around agent/shadow.py.

On every connection (`serve`): get the document, hand the out-of-sync desired keys to the
handlers, report what they reached, send the queued reports; then react to each
``/update/delta`` and each new report until the connection ends.

Reports go through a `ReportQueue` persisted by a `QueueStore` *before* anything is sent, so a
report made offline, or made just before the process dies, is sent on the next connection,
composed with the others into as few updates as the merge rules allow. Updates carry the last
version seen (optimistic locking); a 409 is answered by a get (which also applies any newer
desired state) and the same report is sent again: a report is never dropped for a conflict.
Conflicts in a row back off (the first is retried at once). The reply to our own get is the
service's document as it is now, even at a lower version than we saw: when the service's
versions go back (a restored registry), that is how the device catches up; a delta older than
what we hold is answered by such a get too.
Only a permanent rejection (400, 403, 413, ...) removes it, into a ``.rejected`` file beside
the queue for the operator.

Both files are bounded: the queue refuses a report that would take it over ``max_queue_bytes``
(`ReportQueueFull`; what is queued stays), and the rejected file is rotated to ``.1`` before it
would pass ``max_rejected_bytes``. A write the state folder refuses (full, read-only) never
ends the sync: it is logged, the queue in memory is sent all the same, and the next save (or
report tick) tries again.

A handler interrupted by the end of the connection counts as not attempted: the next connection
hands its keys over again. What the handlers that did finish reached is queued at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from agent import wire
from agent.durable import write_atomic
from agent.handlers import Applied, HandlerSet, Step
from agent.provisioning import RetryPolicy
from agent.session import Message, Session, SessionError, SessionTimeout, wait_future
from agent.shadow import (
    Document,
    NextStep,
    Rejection,
    ReportQueue,
    ReportQueueFull,
    ShadowProtocolError,
    ShadowTracker,
    after_report,
    new_client_token,
    update_request,
)
from agent.shadow_rules import merge

log = logging.getLogger("fleet.agent.shadow")

#: Default bound of one shadow's queue of outgoing reports (encoded bytes).
MAX_QUEUE_BYTES = 64 * 1024
#: Seconds before an unanswered get is sent again (then 2x each time, within the timeout).
GET_FIRST_WAIT = 1.0
#: Default bound of one shadow's ``.rejected.jsonl`` before it is rotated to ``.1``.
MAX_REJECTED_BYTES = 1024 * 1024


class ShadowRejected(Exception):
    def __init__(self, operation: str, rejection: Rejection) -> None:
        super().__init__(f"shadow {operation} rejected: {rejection.code} {rejection.message}")
        self.rejection = rejection


class QueueNotSaved(OSError):
    """The report queue could not be written to the state folder (full, read-only). The
    report is queued in memory all the same: sent while the agent runs, written to disk by
    the next save that works."""

    def __init__(self, where: object, cause: OSError) -> None:
        why = cause.strerror or str(cause)
        if cause.filename is not None and str(cause.filename) != str(where):
            why += f": {cause.filename}"
        super().__init__(cause.errno, why)
        self.message = f"cannot write the report queue {where}: {why}"

    def __str__(self) -> str:
        return self.message


# ------------------------------------------------------------------------------ storage


class QueueStore(Protocol):
    def load(self) -> ReportQueue: ...
    def save(self, queue: ReportQueue) -> None: ...
    def park(self, patch: Document, rejection: Rejection) -> None: ...


class MemoryQueueStore:
    """For virtual devices: the queue lives as long as the process."""

    def __init__(self) -> None:
        self.saved = ReportQueue()
        self.parked: list[tuple[Document, Rejection]] = []

    def load(self) -> ReportQueue:
        return ReportQueue([dict(p) for p in self.saved.patches])

    def save(self, queue: ReportQueue) -> None:
        self.saved = ReportQueue([dict(p) for p in queue.patches])

    def park(self, patch: Document, rejection: Rejection) -> None:
        self.parked.append((patch, rejection))


def shadow_label(shadow: str | None) -> str:
    return "classic" if shadow is None else f"named-{shadow}"


class FileQueueStore:
    """``<state>/shadows/<classic|named-N>.pending.json``, replaced atomically on every change.

    A damaged file is renamed aside (``.damaged``), never silently overwritten. Rejected
    reports go to ``<label>.rejected.jsonl`` (0600), rotated to ``.rejected.jsonl.1`` (the
    older ``.1`` replaced) before an append would take it past ``max_rejected_bytes``."""

    def __init__(
        self, folder: Path, shadow: str | None, *, max_rejected_bytes: int = MAX_REJECTED_BYTES
    ) -> None:
        self.folder = folder
        self.path = folder / f"{shadow_label(shadow)}.pending.json"
        self.rejected_path = folder / f"{shadow_label(shadow)}.rejected.jsonl"
        self.max_rejected_bytes = max_rejected_bytes

    def load(self) -> ReportQueue:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return ReportQueue()
        try:
            return ReportQueue.decode(data)
        except ValueError as exc:
            aside = self.path.with_suffix(".damaged")
            self.path.rename(aside)
            log.error("report queue %s is damaged (%s); moved it to %s", self.path, exc, aside)
            return ReportQueue()

    def save(self, queue: ReportQueue) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if queue:
            write_atomic(self.path, queue.encode(), 0o600)
        else:
            self.path.unlink(missing_ok=True)

    def park(self, patch: Document, rejection: Rejection) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {
            "rejected": {"code": rejection.code, "message": rejection.message},
            "patch": patch,
        }
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        self._rotate_for(len(line))
        fd = os.open(self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(PermissionError):  # not ours: appending is what matters
                os.fchmod(fd, 0o600)  # older versions created it 0644
            os.write(fd, line)
            os.fsync(fd)  # the report leaves the queue next: it must be here for good first
        finally:
            os.close(fd)

    def _rotate_for(self, incoming: int) -> None:
        """Move the rejected file to ``.1`` if ``incoming`` more bytes would take it over the
        bound (a single line over the bound still goes in, into a file of its own)."""
        try:
            size = self.rejected_path.stat().st_size
        except FileNotFoundError:
            return
        if size and size + incoming > self.max_rejected_bytes:
            os.replace(
                self.rejected_path, self.rejected_path.with_name(self.rejected_path.name + ".1")
            )


# --------------------------------------------------------------------------- the sync


class ShadowSync:
    """The device side of one shadow of one thing."""

    def __init__(
        self,
        thing: str,
        shadow: str | None,
        handlers: HandlerSet,
        store: QueueStore,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        store_in_executor: bool = True,
        max_queue_bytes: int = MAX_QUEUE_BYTES,
    ) -> None:
        if max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be positive, not {max_queue_bytes}")
        self.thing = thing
        self.shadow = shadow
        self.handlers = handlers
        self.store = store
        self.timeout = timeout
        self.retry = retry or RetryPolicy(max_attempts=1_000_000, base_delay=0.5, max_delay=30.0)
        self.tracker = ShadowTracker()
        self.queue = store.load()
        self.max_queue_bytes = max_queue_bytes
        self.last_sync: float | None = None  # wall clock of the last get or accepted report
        self.reached: Document = {}  # everything this agent reported, merged: re-sent on delete
        self.rejections: list[Rejection] = []  # permanent rejections of reports, oldest first
        self._store_in_executor = store_in_executor
        self._session: Session | None = None
        self._wake = asyncio.Event()
        self._pending: dict[str, asyncio.Future[Document | Rejection]] = {}
        self._drained = asyncio.Event()
        self._unhandled_logged: set[str] = set()
        self._resync = False  # a stale delta came in: get the document before going on
        self._gets: dict[str, int | None] = {}  # our gets on their way: the version when sent
        if not self.queue:
            self._drained.set()
        elif (size := self.queue.size()) > max_queue_bytes:
            # Kept whole (the limit was lowered, say): new reports wait until it is sent.
            log.warning(
                "shadow %s: the report queue holds %d bytes, over the limit of %d; "
                "new reports are refused until it is sent",
                self.name,
                size,
                max_queue_bytes,
            )

    @property
    def name(self) -> str:
        return self.shadow or "classic"

    # ---------------------------------------------------------------- topics

    def _reply(self, operation: wire.ShadowOperation, outcome: str) -> str:
        return wire.shadow_reply(self.thing, operation, outcome, self.shadow)

    def subscriptions(self) -> list[str]:
        return [
            self._reply("get", wire.ACCEPTED),
            self._reply("get", wire.REJECTED),
            self._reply("update", wire.ACCEPTED),
            self._reply("update", wire.REJECTED),
            wire.shadow_delta(self.thing, self.shadow),
            self._reply("delete", wire.ACCEPTED),
        ]

    def attach(self, session: Session) -> None:
        """Route this shadow's replies from ``session`` (before subscribing)."""
        routes = {
            self._reply("get", wire.ACCEPTED): self._on_get_accepted,
            self._reply("get", wire.REJECTED): self._on_rejected,
            self._reply("update", wire.ACCEPTED): self._on_update_accepted,
            self._reply("update", wire.REJECTED): self._on_rejected,
            wire.shadow_delta(self.thing, self.shadow): self._on_delta,
            self._reply("delete", wire.ACCEPTED): self._on_deleted,
        }
        for topic, handler in routes.items():
            session.route(topic, self._decoded(handler))
        self._session = session

    # --------------------------------------------------------------- public

    async def serve(self, session: Session) -> None:
        """Sync over ``session`` (attached and subscribed) until it closes or we are cancelled."""
        self._session = session
        try:
            await self.refresh()
            while True:
                self._wake.clear()
                if self._resync:
                    self._resync = False
                    await self.refresh()
                await self._apply_delta()
                await self._flush()
                if not self._wake.is_set():
                    await self._wake.wait()
        except SessionError as exc:
            log.info("shadow %s: connection gone (%s)", self.name, exc)
        finally:
            self._session = None
            for future in self._pending.values():
                if not future.done():
                    future.cancel()
            self._pending.clear()

    async def report(self, patch: Mapping[str, Any]) -> bool:
        """Queue ``patch`` for ``reported`` (durably) and wake the sender. False if it would
        change nothing the service will hold.

        Raises ReportQueueFull, queue unchanged, if the queue would outgrow
        ``max_queue_bytes``: the caller keeps the report or reports again later. Raises
        QueueNotSaved if the state folder refuses the write: queued in memory only."""
        if not self._enqueue(patch):
            return False
        try:
            await self._save()
        finally:
            self._wake.set()
        return True

    async def wait_sent(self, timeout: float) -> bool:
        """Wait until every queued report is accepted; False on timeout."""
        # asyncio.wait, not wait_for: before Python 3.12 wait_for may swallow a cancellation
        # that arrives as the event is set, and the caller's task would never stop.
        drained = asyncio.ensure_future(self._drained.wait())
        try:
            done, _ = await asyncio.wait({drained}, timeout=timeout)
        finally:
            drained.cancel()
        return bool(done)

    async def refresh(self) -> Document | None:
        """get: the service's document, applied to the tracker (None: no shadow yet).

        A get nobody answered was dropped (the broker keeps no request for a service that is
        not subscribed yet, as right after a broker restart), and asking again is harmless: so
        it is sent again after 1, 2, 4... s, a new token each time, within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        wait = GET_FIRST_WAIT
        while True:
            token = new_client_token()
            self._gets[token] = self.tracker.version
            try:
                outcome = await self._request(
                    "get", {"clientToken": token}, min(wait, deadline - loop.time())
                )
                break
            except SessionTimeout:
                if deadline - loop.time() <= 0.05:
                    raise SessionTimeout(
                        f"no reply to shadow get of {self.name} within {self.timeout:g} s"
                    ) from None
                log.info(
                    "shadow %s: no reply to get in %g s (are the fleet services up?); asking again",
                    self.name,
                    wait,
                )
                wait *= 2
            finally:
                self._gets.pop(token, None)
        if isinstance(outcome, Rejection):
            if outcome.code == 404:
                self.tracker.on_get_missing()
                self.last_sync = time.time()
                return None
            raise ShadowRejected("get", outcome)
        self.last_sync = time.time()
        self._wake.set()
        return outcome

    async def send_queued(self) -> None:
        """Once, without applying desired state: get (for the version), then send the queue.
        For a command at the device; the daemon uses `serve`."""
        await self.refresh()
        await self._flush()

    def retry_failed(self) -> None:
        """Give handlers that failed or were interrupted another go, and the queue if a write
        error left it behind (called on the report tick)."""
        if self.queue or any(k not in self.tracker.attempted for k in self.tracker.delta):
            self._wake.set()

    # ------------------------------------------------------------ internals

    def _enqueue(self, patch: Mapping[str, Any]) -> bool:
        """Add what ``patch`` changes to the queue, in memory; False if it changes nothing."""
        changes = self.tracker.report_changes(patch, self.queue)
        if not changes:
            return False
        try:
            self.queue.add(changes, self.max_queue_bytes)
        except ReportQueueFull as exc:
            raise ReportQueueFull(exc.size, exc.limit, self.name) from None
        self._drained.clear()
        return True

    def _not_saved(self, exc: OSError) -> QueueNotSaved:
        return QueueNotSaved(getattr(self.store, "path", f"of shadow {self.name}"), exc)

    async def _save(self) -> None:
        """Raises QueueNotSaved."""
        try:
            if self._store_in_executor:
                snapshot = ReportQueue([dict(p) for p in self.queue.patches])
                await asyncio.get_running_loop().run_in_executor(None, self.store.save, snapshot)
            else:
                self.store.save(self.queue)
        except OSError as exc:
            raise self._not_saved(exc) from None

    async def _save_or_log(self) -> None:
        """For the sync itself: a disk that refuses the write must not end the connection."""
        try:
            await self._save()
        except QueueNotSaved as exc:
            log.warning("shadow %s: %s; trying again on the next save", self.name, exc)

    async def _request(
        self, operation: wire.ShadowOperation, document: Document, timeout: float | None = None
    ) -> Document | Rejection:
        timeout = self.timeout if timeout is None else timeout
        session = self._session
        if session is None:
            raise SessionError("not connected")
        token = document["clientToken"]
        future: asyncio.Future[Document | Rejection] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            topic = wire.shadow_topic(self.thing, operation, self.shadow)
            await session.publish(topic, wire.encode(document), timeout=self.timeout)
            return await wait_future(
                future,
                timeout,
                lambda: SessionTimeout(
                    f"no reply to shadow {operation} of {self.name} within {timeout:g} s"
                ),
            )
        finally:
            self._pending.pop(token, None)

    async def _apply_delta(self) -> None:
        fresh = self.tracker.to_apply(self.tracker.delta)
        if not fresh:
            return
        steps: list[Step] = []
        try:
            async for step in self.handlers.steps(
                self.thing, self.shadow, fresh, self.tracker.desired
            ):
                steps.append(step)
        except BaseException:
            # Interrupted (the connection ended, the agent stops): a handler that had not
            # returned was not attempted, so the next connection hands its keys over again;
            # what the finished ones reached is queued now, on disk before we go.
            finished = {key for step in steps for key in step.keys}
            self.tracker.forget_attempts([key for key in fresh if key not in finished])
            if self._settle(fresh, Applied.of(steps)):
                try:
                    self.store.save(self.queue)
                except OSError as exc:
                    log.warning("shadow %s: %s", self.name, self._not_saved(exc))
            raise
        if self._settle(fresh, Applied.of(steps)):
            await self._save_or_log()
            self._wake.set()

    def _settle(self, fresh: Mapping[str, Any], applied: Applied) -> bool:
        """Record what the handlers did with ``fresh``; True if their report was queued."""
        self.tracker.forget_attempts(applied.failed)
        new = applied.unhandled - self._unhandled_logged
        if new:
            self._unhandled_logged |= new
            log.warning(
                "shadow %s: no handler for desired key(s) %s; left unapplied",
                self.name,
                ", ".join(sorted(new)),
            )
        if not applied.reported:
            return False
        try:
            return self._enqueue(applied.reported)
        except ReportQueueFull as exc:
            # Not lost: the handlers run again (as after a failure) once there is room.
            self.tracker.forget_attempts(fresh)
            log.warning("shadow %s: handlers' report not queued: %s", self.name, exc)
            if self.queue:
                self._wake.set()  # serve sends the queue first, then re-runs them
            return False

    async def _flush(self) -> None:
        failures = conflicts = 0
        while self.queue:
            head = self.queue.head()
            assert head is not None
            self.queue.head_sealed = True
            request = update_request(head, new_client_token(), self.tracker.lock_version())
            try:
                outcome = await self._request("update", request)
            except SessionTimeout:
                outcome = Rejection(504, "no reply", None)
            decision = after_report(
                outcome, conflicts=conflicts, failures=failures, backoff=self.retry.backoff
            )
            conflicts, failures = decision.conflicts, decision.failures
            if decision.step is NextStep.SENT:
                self.queue.pop_head()
                self.reached = merge(self.reached, head)
                self.last_sync = time.time()
                await self._save_or_log()
                continue
            assert isinstance(outcome, Rejection)
            self.queue.head_sealed = False
            if decision.step is NextStep.RESYNC:
                log.info(
                    "shadow %s: version conflict; getting the document and retrying%s",
                    self.name,
                    f" in {decision.delay:.1f} s" if decision.delay else "",
                )
                await asyncio.sleep(decision.delay)
                await self.refresh()
                await self._apply_delta()
                continue
            if decision.step is NextStep.RETRY:
                log.warning(
                    "shadow %s: report not accepted (%d %s); retrying in %.1f s",
                    self.name,
                    outcome.code,
                    outcome.message,
                    decision.delay,
                )
                await asyncio.sleep(decision.delay)
                continue
            log.error(
                "shadow %s: report rejected for good (%d %s); kept in the rejected file",
                self.name,
                outcome.code,
                outcome.message,
            )
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, self.store.park, head, outcome
                )
            except OSError as exc:
                where = getattr(self.store, "rejected_path", "the rejected file")
                log.error(
                    "shadow %s: cannot keep the rejected report in %s (%s); it stays queued, "
                    "tried again on the next report tick",
                    self.name,
                    where,
                    exc.strerror or exc,
                )
                return
            self.rejections.append(outcome)
            self.queue.pop_head()
            await self._save_or_log()
        self._drained.set()

    # ------------------------------------------------------------- messages

    def _decoded(self, handler: Any) -> Any:
        def on_message(message: Message) -> None:
            try:
                document = wire.decode(message.payload)
                handler(document)
            except (ValueError, ShadowProtocolError) as exc:
                log.warning(
                    "shadow %s: ignored a bad message on %s: %s", self.name, message.topic, exc
                )

        return on_message

    def _waiting(self, document: object) -> asyncio.Future[Document | Rejection] | None:
        """Our own request's future, if ``document`` answers one still waiting."""
        token = document.get("clientToken") if isinstance(document, dict) else None
        future = self._pending.get(token) if isinstance(token, str) else None
        return future if future is not None and not future.done() else None

    def _resolve(self, document: object, outcome: Document | Rejection) -> None:
        future = self._waiting(document)
        if future is not None:
            future.set_result(outcome)

    def _on_get_accepted(self, document: object) -> None:
        # Our own get, and nothing newer came in while it was on its way: this is the
        # service's document now, whatever its version.
        token = document.get("clientToken") if isinstance(document, dict) else None
        current = (
            self._waiting(document) is not None
            and token in self._gets
            and self._gets[token] == self.tracker.version
        )
        self.tracker.on_get_accepted(document, current=current)
        if current:
            self._resync = False
        self._resolve(document, document)  # type: ignore[arg-type]
        self._wake.set()

    def _on_update_accepted(self, document: object) -> None:
        self.tracker.on_update_accepted(document)
        self._resolve(document, document)  # type: ignore[arg-type]

    def _on_rejected(self, document: object) -> None:
        self._resolve(document, Rejection.parse(document))

    def _on_delta(self, document: object) -> None:
        if self.tracker.on_delta(document) is None:
            # Older than what we hold: delivered late, or the service's versions went back
            # and every delta will look like this. Only a get tells which.
            self._resync = True
        self._wake.set()

    def _on_deleted(self, document: object) -> None:
        self.tracker.on_deleted(document)
        self.tracker.attempted.clear()
        if self.reached:
            # Someone deleted the shadow: the device still is what it reported; say so again.
            # Unbounded on purpose: this is state already accepted once, not a new report.
            self.queue.add(self.reached)
            self._drained.clear()
            self._wake.set()
