"""The agent's shadow sync against the real stack (Mosquitto + plugin + services).

In-process: `ShadowSync` over a real `Session` with a device certificate, for the sync rules
(apply, report, conflicts, rejections, offline queue). The daemon and the command line are
covered in test_agent_run.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import wire
from agent.handlers import DesiredChange, HandlerSet
from agent.session import Session, connect
from agent.shadow import Document, Rejection, ReportQueue, ShadowTracker
from agent.shadow_sync import (
    MAX_QUEUE_BYTES,
    FileQueueStore,
    MemoryQueueStore,
    QueueStore,
    ReportQueueFull,
    ShadowSync,
)
from tests.fleet import Client, Fleet, make_workdir, running_fleet

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with running_fleet(services=True) as running:
        yield running


@pytest.fixture
def operator(fleet: Fleet) -> Client:
    """Someone at the cloud side: the service identity under a client id of its own (closed
    after each test by conftest)."""
    return fleet.client(fleet.service, "operator-sync")


def desire(operator: Client, thing: str, desired: dict[str, Any], shadow: str | None = None) -> int:
    """Set desired state as the operator; return the new version."""
    token = f"op-{time.monotonic_ns()}"
    topic = wire.shadow_topic(thing, "update", shadow)
    accepted = wire.shadow_reply(thing, "update", "accepted", shadow)
    operator.subscribe(accepted)
    operator.publish(topic, json.dumps({"state": {"desired": desired}, "clientToken": token}))
    reply = operator.received.wait_for(
        lambda m: m.topic == accepted and json.loads(m.payload).get("clientToken") == token
    )
    assert reply is not None, "the operator's update was not accepted"
    return json.loads(reply.payload)["version"]


def stored(fleet: Fleet, thing: str, shadow: str | None = None) -> dict[str, Any] | None:
    """The shadow document as the service stored it (None: no shadow)."""
    with fleet.registry() as registry:
        row = registry.load_shadow(thing, shadow or "")
    if row is None or row.document is None:
        return None
    document: dict[str, Any] = json.loads(row.document)
    document["version"] = row.version
    return document


def state_of(fleet: Fleet, thing: str, section: str) -> dict[str, Any]:
    document = stored(fleet, thing) or {}
    return document.get("state", {}).get(section, {})


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def device_session(fleet: Fleet, thing: str) -> Session:
    creds = fleet.device(thing)
    return await connect(
        fleet.config.connect_host,
        fleet.config.port,
        client_id=thing,
        ca=fleet.pki.ca_cert,
        cert=creds.cert,
        key=creds.key,
    )


async def syncing(
    fleet: Fleet,
    thing: str,
    handlers: HandlerSet,
    body: Callable[[ShadowSync], Awaitable[None]],
    store: QueueStore | None = None,
    session: Session | None = None,
    max_queue_bytes: int = MAX_QUEUE_BYTES,
) -> ShadowSync:
    """Run ``body`` while a ShadowSync serves ``thing`` over a fresh device session."""
    sync = ShadowSync(
        thing,
        None,
        handlers,
        store or MemoryQueueStore(),
        timeout=5,
        max_queue_bytes=max_queue_bytes,
    )
    await connected(fleet, sync, body, session)
    return sync


async def connected(
    fleet: Fleet,
    sync: ShadowSync,
    body: Callable[[ShadowSync], Awaitable[None]],
    session: Session | None = None,
) -> None:
    """Run ``body`` while ``sync`` serves over one connection; then end it as the runtime
    does when a connection ends: cancel the sync, disconnect."""
    session = session or await device_session(fleet, sync.thing)
    sync.attach(session)
    await session.subscribe(*sync.subscriptions())
    serving = asyncio.create_task(sync.serve(session))
    try:
        await body(sync)
        assert not serving.done(), "the sync ended on its own"
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await session.disconnect()


def led_handlers(calls: list[DesiredChange]) -> HandlerSet:
    handlers = HandlerSet()

    def apply_led(change: DesiredChange) -> dict[str, Any]:
        calls.append(change)
        return {"led": change.delta["led"]}

    handlers.register(apply_led, keys=["led"])
    return handlers


def test_desired_change_is_applied_reported_and_the_delta_empties(
    fleet: Fleet, operator: Client
) -> None:
    calls: list[DesiredChange] = []

    async def body(sync: ShadowSync) -> None:
        await sync.report({"firmware": "1.0"})
        assert await sync.wait_sent(5)
        desire(operator, "sync-led", {"led": "green"})
        await eventually(lambda: state_of(fleet, "sync-led", "reported").get("led") == "green")
        await eventually(lambda: sync.tracker.delta == {})

    asyncio.run(syncing(fleet, "sync-led", led_handlers(calls), body))
    assert [c.delta for c in calls] == [{"led": "green"}]
    assert calls[0].thing == "sync-led" and calls[0].shadow is None
    document = stored(fleet, "sync-led")
    assert document is not None
    assert document["state"]["reported"] == {"firmware": "1.0", "led": "green"}
    assert "delta" not in document["state"]


def test_desired_state_set_while_offline_is_applied_on_connect(
    fleet: Fleet, operator: Client
) -> None:
    calls: list[DesiredChange] = []
    fleet.device("sync-early")  # the thing exists; its device is not connected yet
    desire(operator, "sync-early", {"led": "red", "mode": "eco"})

    async def body(sync: ShadowSync) -> None:
        await eventually(lambda: state_of(fleet, "sync-early", "reported") == {"led": "red"})

    sync = asyncio.run(syncing(fleet, "sync-early", led_handlers(calls), body))
    assert [c.delta for c in calls] == [{"led": "red"}]
    assert sync.tracker.delta == {"mode": "eco"}  # nobody handles it: left unapplied, not faked


def test_a_state_the_device_cannot_reach_is_reported_once_without_a_loop(
    fleet: Fleet, operator: Client
) -> None:
    """desired 30, device reaches 25: the delta stays, and reporting 25 again is not re-sent."""
    handlers = HandlerSet()
    calls: list[Any] = []

    def clamp(change: DesiredChange) -> dict[str, Any]:
        calls.append(change.delta["temp"])
        return {"temp": min(25, change.delta["temp"])}

    handlers.register(clamp, keys=["temp"])

    async def body(sync: ShadowSync) -> None:
        desire(operator, "sync-clamp", {"temp": 30})
        await eventually(lambda: state_of(fleet, "sync-clamp", "reported").get("temp") == 25)
        settled = (stored(fleet, "sync-clamp") or {})["version"]
        await asyncio.sleep(1.0)  # give a loop the chance to show itself
        assert (stored(fleet, "sync-clamp") or {})["version"] == settled
        assert sync.tracker.delta == {"temp": 30}

    asyncio.run(syncing(fleet, "sync-clamp", handlers, body))
    assert calls == [30]


def test_a_version_conflict_is_resolved_by_get_and_retry(fleet: Fleet) -> None:
    async def body(sync: ShadowSync) -> None:
        await sync.report({"a": 1})
        assert await sync.wait_sent(5)
        assert sync.tracker.version is not None
        sync.tracker.version -= 1  # as if an update by someone else had not reached us yet
        await sync.report({"b": 2})
        assert await sync.wait_sent(5)

    sync = asyncio.run(syncing(fleet, "sync-conflict", HandlerSet(), body))
    assert state_of(fleet, "sync-conflict", "reported") == {"a": 1, "b": 2}
    assert sync.rejections == []


def test_a_report_the_service_rejects_is_kept_aside_and_the_queue_goes_on(fleet: Fleet) -> None:
    store = MemoryQueueStore()

    async def body(sync: ShadowSync) -> None:
        await sync.report({"blob": "x" * 9000})  # over the 8 KB state limit: 413
        assert await sync.wait_sent(5)
        await sync.report({"small": True})
        assert await sync.wait_sent(5)

    sync = asyncio.run(syncing(fleet, "sync-413", HandlerSet(), body, store))
    assert [r.code for r in sync.rejections] == [413]
    assert [patch for patch, _ in store.parked] == [{"blob": "x" * 9000}]
    assert state_of(fleet, "sync-413", "reported") == {"small": True}


def test_a_shadow_deleted_by_the_operator_is_reported_again(fleet: Fleet, operator: Client) -> None:
    async def body(sync: ShadowSync) -> None:
        await sync.report({"serial": "SN-9"})
        assert await sync.wait_sent(5)
        token = "op-delete"
        operator.publish(
            wire.shadow_topic("sync-delete", "delete"), json.dumps({"clientToken": token})
        )
        await eventually(
            lambda: (
                state_of(fleet, "sync-delete", "reported") == {"serial": "SN-9"}
                and (stored(fleet, "sync-delete") or {}).get("version", 0) >= 2
            )
        )

    asyncio.run(syncing(fleet, "sync-delete", HandlerSet(), body))


def test_offline_reports_are_persisted_and_merged_into_one_update(
    fleet: Fleet, operator: Client
) -> None:
    """Reports made with no connection land in the queue file, survive a restart of the agent
    (a new ShadowSync on the same folder) and reach the service as a single update."""
    folder = make_workdir() / "shadows"
    offline = ShadowSync("sync-offline", None, HandlerSet(), FileQueueStore(folder, None))

    async def report_offline() -> None:
        await offline.report({"boot": 1, "net": {"ssid": "a"}})
        await offline.report({"net": {"rssi": -60}})
        await offline.report({"boot": 2})

    asyncio.run(report_offline())
    queue_file = folder / "classic.pending.json"
    saved = json.loads(queue_file.read_text())
    assert saved["patches"] == [{"boot": 2, "net": {"ssid": "a", "rssi": -60}}]
    assert queue_file.stat().st_mode & 0o777 == 0o600

    documents = wire.shadow_documents("sync-offline")
    operator.subscribe(documents)

    async def body(sync: ShadowSync) -> None:
        assert await sync.wait_sent(5)

    fleet.device("sync-offline")
    restarted = FileQueueStore(folder, None)
    asyncio.run(syncing(fleet, "sync-offline", HandlerSet(), body, restarted))
    assert state_of(fleet, "sync-offline", "reported") == {
        "boot": 2,
        "net": {"ssid": "a", "rssi": -60},
    }
    assert (stored(fleet, "sync-offline") or {})["version"] == 1  # one update
    assert not queue_file.exists()


def test_a_key_deleted_then_set_to_an_object_offline_keeps_its_meaning(fleet: Fleet) -> None:
    """null then an object cannot be one update (it would merge into the old object): two."""
    store = MemoryQueueStore()

    async def body(sync: ShadowSync) -> None:
        await sync.report({"net": {"ssid": "a", "dhcp": True}})
        assert await sync.wait_sent(5)

    asyncio.run(syncing(fleet, "sync-replace", HandlerSet(), body, store))
    later = ShadowSync("sync-replace", None, HandlerSet(), store, store_in_executor=False)
    later.tracker.reported = {"net": {"ssid": "a", "dhcp": True}}

    async def offline() -> None:
        await later.report({"net": None})
        await later.report({"net": {"ssid": "b"}})

    asyncio.run(offline())
    assert len(store.saved.patches) == 2

    async def flush(sync: ShadowSync) -> None:
        assert await sync.wait_sent(5)

    asyncio.run(syncing(fleet, "sync-replace", HandlerSet(), flush, store))
    assert state_of(fleet, "sync-replace", "reported") == {"net": {"ssid": "b"}}


@pytest.mark.unit
def test_a_damaged_queue_file_is_moved_aside_not_lost(tmp_path: Path) -> None:
    folder = tmp_path / "shadows"
    folder.mkdir()
    (folder / "classic.pending.json").write_text("{not json")
    store = FileQueueStore(folder, None)
    assert not store.load()
    assert (folder / "classic.pending.damaged").read_text() == "{not json"


def filled_store(patches: list[dict[str, Any]]) -> MemoryQueueStore:
    """A store holding ``patches``, as if reported while offline before a restart."""
    store = MemoryQueueStore()
    store.saved = ReportQueue(patches)
    return store


@pytest.mark.unit
def test_a_report_over_the_queue_limit_is_refused_and_the_queue_kept() -> None:
    store = MemoryQueueStore()
    sync = ShadowSync("t", None, HandlerSet(), store, max_queue_bytes=200)

    async def main() -> None:
        assert await sync.report({"a": "x" * 100})
        with pytest.raises(ReportQueueFull) as refused:
            await sync.report({"b": "y" * 100})
        assert "shadow classic" in str(refused.value)
        assert refused.value.limit == 200
        assert await sync.report({"c": 1})  # a report that fits still goes in

    asyncio.run(main())
    assert sync.queue.patches == [{"a": "x" * 100, "c": 1}]
    assert store.saved.patches == sync.queue.patches


@pytest.mark.unit
def test_a_report_too_large_alone_leaves_an_empty_queue_drained() -> None:
    sync = ShadowSync("t", "lights", HandlerSet(), MemoryQueueStore(), max_queue_bytes=50)

    async def main() -> None:
        with pytest.raises(ReportQueueFull, match="shadow lights"):
            await sync.report({"blob": "x" * 100})
        assert await sync.wait_sent(0.1)  # nothing waits to be sent

    asyncio.run(main())
    assert not sync.queue


@pytest.mark.unit
def test_a_queue_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_queue_bytes"):
        ShadowSync("t", None, HandlerSet(), MemoryQueueStore(), max_queue_bytes=0)


@pytest.mark.unit
def test_a_queue_file_over_the_limit_is_kept_whole_and_refuses_reports(tmp_path: Path) -> None:
    """The limit was lowered under what is on disk: nothing is dropped; reports wait."""
    folder = tmp_path / "shadows"
    store = FileQueueStore(folder, None)
    store.save(ReportQueue([{"log": "l" * 500}, {"k": {"x": 1}}]))
    on_disk = store.path.read_bytes()
    sync = ShadowSync("t", None, HandlerSet(), FileQueueStore(folder, None), max_queue_bytes=100)
    assert sync.queue.encode() == on_disk

    async def main() -> None:
        with pytest.raises(ReportQueueFull):
            await sync.report({"boot": 1})

    asyncio.run(main())
    assert store.path.read_bytes() == on_disk
    assert not asyncio.run(sync.wait_sent(0.01))  # still to be sent


@pytest.mark.unit
def test_the_rejected_file_is_rotated_before_it_passes_its_bound(tmp_path: Path) -> None:
    store = FileQueueStore(tmp_path / "shadows", None, max_rejected_bytes=300)
    rotated = store.rejected_path.with_name("classic.rejected.jsonl.1")
    for n in range(12):
        store.park({"n": n, "pad": "p" * 40}, Rejection(400, "bad", None))
        assert store.rejected_path.stat().st_size <= 300
    current = [
        json.loads(line)["patch"]["n"] for line in store.rejected_path.read_text().splitlines()
    ]
    older = [json.loads(line)["patch"]["n"] for line in rotated.read_text().splitlines()]
    assert older + current == list(range(older[0], 12))  # newest kept, in order, no gaps
    assert rotated.stat().st_size <= 300
    assert older[0] > 0  # rotated more than once: the older .1 was replaced
    assert json.loads(store.rejected_path.read_text().splitlines()[-1])["rejected"] == {
        "code": 400,
        "message": "bad",
    }


@pytest.mark.unit
def test_a_rejected_report_over_the_bound_alone_gets_a_file_of_its_own(tmp_path: Path) -> None:
    store = FileQueueStore(tmp_path / "shadows", None, max_rejected_bytes=100)
    store.park({"small": 1}, Rejection(400, "bad", None))
    store.park({"blob": "x" * 500}, Rejection(413, "too large", None))
    rotated = store.rejected_path.with_name("classic.rejected.jsonl.1")
    assert json.loads(rotated.read_text())["patch"] == {"small": 1}
    assert json.loads(store.rejected_path.read_text())["patch"] == {"blob": "x" * 500}


@pytest.mark.unit
def test_the_rejected_files_are_private(tmp_path: Path) -> None:
    folder = tmp_path / "shadows"
    folder.mkdir()
    store = FileQueueStore(folder, "lights", max_rejected_bytes=100)
    store.rejected_path.write_text("")  # as an older version left it
    store.rejected_path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        store.park({"a": 1}, Rejection(400, "bad", None))
        store.park({"b": "x" * 100}, Rejection(400, "bad", None))  # rotates
    finally:
        os.umask(old_umask)
    assert store.rejected_path.name == "named-lights.rejected.jsonl"
    for path in (
        store.rejected_path,
        store.rejected_path.with_name(store.rejected_path.name + ".1"),
    ):
        assert path.stat().st_mode & 0o777 == 0o600


def test_a_queue_over_the_limit_is_sent_on_connect_then_reports_flow(fleet: Fleet) -> None:
    store = filled_store([{"log": "l" * 400}])

    async def body(sync: ShadowSync) -> None:
        assert await sync.wait_sent(5)
        assert await sync.report({"boot": 1})
        assert await sync.wait_sent(5)

    asyncio.run(syncing(fleet, "sync-full", HandlerSet(), body, store, max_queue_bytes=100))
    assert state_of(fleet, "sync-full", "reported") == {"log": "l" * 400, "boot": 1}


def test_handlers_refused_by_a_full_queue_run_again_once_it_is_sent(
    fleet: Fleet, operator: Client
) -> None:
    """What the handlers reached is not lost to a full queue: they run again after it."""
    calls: list[DesiredChange] = []
    fleet.device("sync-full-led")
    desire(operator, "sync-full-led", {"led": "green"})
    store = filled_store([{"log": "l" * 250}])
    limit = store.saved.size() + 5  # room for nothing more

    async def body(sync: ShadowSync) -> None:
        await eventually(
            lambda: (
                state_of(fleet, "sync-full-led", "reported") == {"log": "l" * 250, "led": "green"}
            )
        )

    asyncio.run(
        syncing(fleet, "sync-full-led", led_handlers(calls), body, store, max_queue_bytes=limit)
    )
    assert [c.delta for c in calls] == [{"led": "green"}, {"led": "green"}]


def test_named_shadow_sync_is_separate(fleet: Fleet, operator: Client) -> None:
    calls: list[DesiredChange] = []
    handlers = led_handlers(calls)

    async def main() -> None:
        session = await device_session(fleet, "sync-named")
        sync = ShadowSync("sync-named", "lights", handlers, MemoryQueueStore(), timeout=5)
        sync.attach(session)
        await session.subscribe(*sync.subscriptions())
        serving = asyncio.create_task(sync.serve(session))
        try:
            desire(operator, "sync-named", {"led": "blue"}, shadow="lights")
            await eventually(
                lambda: (
                    ((stored(fleet, "sync-named", "lights") or {}).get("state", {}))
                    .get("reported", {})
                    .get("led")
                    == "blue"
                )
            )
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await session.disconnect()

    asyncio.run(main())
    assert calls[0].shadow == "lights"
    assert stored(fleet, "sync-named") is None  # the classic shadow was never touched


# ------------------------------------------------------------- faults (review 2026-12)


def test_a_handler_cut_off_by_the_end_of_the_connection_runs_again_on_the_next(
    fleet: Fleet, operator: Client
) -> None:
    """F1: the connection ends while the handler runs (the runtime cancels the sync): that
    was no attempt. The next connection hands the delta over again and reports the result."""
    calls: list[Document] = []
    handlers = HandlerSet()

    async def slow_led(change: DesiredChange) -> dict[str, Any]:
        calls.append(change.delta)
        if len(calls) == 1:
            await asyncio.Event().wait()  # still running when the connection ends
        return {"led": change.delta["led"]}

    handlers.register(slow_led, keys=["led"])
    fleet.device("sync-cut")
    desire(operator, "sync-cut", {"led": "amber"})
    sync = ShadowSync("sync-cut", None, handlers, MemoryQueueStore(), timeout=5)

    async def cut(sync: ShadowSync) -> None:
        await eventually(lambda: len(calls) == 1)

    async def reconnected(sync: ShadowSync) -> None:
        await eventually(lambda: state_of(fleet, "sync-cut", "reported") == {"led": "amber"})

    async def main() -> None:
        await connected(fleet, sync, cut)
        assert "led" not in sync.tracker.attempted
        await connected(fleet, sync, reconnected)

    asyncio.run(main())
    assert calls == [{"led": "amber"}, {"led": "amber"}]


def test_what_finished_handlers_reached_before_the_connection_ended_is_reported(
    fleet: Fleet, operator: Client
) -> None:
    """F1: of two handlers, the first returned before the connection ended: its result is
    queued (on disk) at once and reported; only the interrupted one runs again."""
    led_calls: list[DesiredChange] = []
    fan_calls: list[Document] = []
    handlers = led_handlers(led_calls)

    async def slow_fan(change: DesiredChange) -> dict[str, Any]:
        fan_calls.append(change.delta)
        if len(fan_calls) == 1:
            await asyncio.Event().wait()
        return {"fan": change.delta["fan"]}

    handlers.register(slow_fan, keys=["fan"])
    fleet.device("sync-half")
    desire(operator, "sync-half", {"led": "red", "fan": 3})
    store = MemoryQueueStore()
    sync = ShadowSync("sync-half", None, handlers, store, timeout=5)

    async def cut(sync: ShadowSync) -> None:
        await eventually(lambda: len(fan_calls) == 1)

    async def reconnected(sync: ShadowSync) -> None:
        await eventually(
            lambda: state_of(fleet, "sync-half", "reported") == {"led": "red", "fan": 3}
        )

    async def main() -> None:
        await connected(fleet, sync, cut)
        assert store.saved.patches == [{"led": "red"}]
        await connected(fleet, sync, reconnected)

    asyncio.run(main())
    assert [c.delta for c in led_calls] == [{"led": "red"}]
    assert fan_calls == [{"fan": 3}, {"fan": 3}]


def test_the_get_on_connect_is_the_truth_even_at_a_lower_version(
    fleet: Fleet, operator: Client
) -> None:
    """F2: the device saw version 1000 before the service's versions went back (a registry
    restored from a backup): the get on connect still applies, and the version follows."""
    calls: list[DesiredChange] = []
    fleet.device("sync-back-get")
    desire(operator, "sync-back-get", {"led": "violet"})
    sync = ShadowSync("sync-back-get", None, led_handlers(calls), MemoryQueueStore(), timeout=5)
    sync.tracker.version, sync.tracker.exists = 1000, True

    async def body(sync: ShadowSync) -> None:
        await eventually(lambda: state_of(fleet, "sync-back-get", "reported") == {"led": "violet"})

    asyncio.run(connected(fleet, sync, body))
    assert [c.delta for c in calls] == [{"led": "violet"}]
    assert sync.tracker.version == (stored(fleet, "sync-back-get") or {})["version"]


def test_after_the_versions_went_back_a_report_goes_through_after_one_conflict(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """F2: update with our (too high) version -> 409 -> get (lower version, taken) -> update
    accepted. Before, the get was dropped as stale and the update -> 409 loop never ended."""
    caplog.set_level(logging.INFO, logger="fleet.agent.shadow")

    async def body(sync: ShadowSync) -> None:
        await sync.report({"a": 1})
        assert await sync.wait_sent(5)
        assert sync.tracker.version is not None
        sync.tracker.version += 50  # as if the service had lost its last 50 versions
        caplog.clear()
        await sync.report({"b": 2})
        assert await sync.wait_sent(5)

    sync = asyncio.run(syncing(fleet, "sync-back-409", HandlerSet(), body))
    assert state_of(fleet, "sync-back-409", "reported") == {"a": 1, "b": 2}
    assert caplog.text.count("version conflict") == 1
    assert sync.tracker.version == (stored(fleet, "sync-back-409") or {})["version"]


def test_after_the_versions_went_back_a_new_desired_value_is_applied(
    fleet: Fleet, operator: Client
) -> None:
    """F2, connected all along (the services restored, the broker not restarted): a delta
    older than what we hold asks for a get, whose document is taken."""
    calls: list[DesiredChange] = []

    async def body(sync: ShadowSync) -> None:
        await sync.report({"boot": 1})
        assert await sync.wait_sent(5)
        assert sync.tracker.version is not None
        sync.tracker.version += 50
        desire(operator, "sync-back-delta", {"led": "teal"})
        await eventually(
            lambda: state_of(fleet, "sync-back-delta", "reported").get("led") == "teal"
        )

    asyncio.run(syncing(fleet, "sync-back-delta", led_handlers(calls), body))
    assert [c.delta for c in calls] == [{"led": "teal"}]


class DeafTracker(ShadowTracker):
    """Never takes a get: a view of the shadow that cannot converge."""

    def on_get_accepted(self, document: object, *, current: bool = False) -> Document:
        return {}


def test_conflicts_in_a_row_back_off(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """F2: when 409s keep coming, the retries slow down (jittered, exponential, bounded)
    instead of hundreds of update -> 409 -> get rounds a second."""
    caplog.set_level(logging.INFO, logger="fleet.agent.shadow")

    async def body(sync: ShadowSync) -> None:
        await sync.report({"a": 1})
        assert await sync.wait_sent(5)
        assert sync.tracker.version is not None
        stuck = DeafTracker(version=sync.tracker.version + 50, exists=True)
        stuck.reported = dict(sync.tracker.reported)
        sync.tracker = stuck
        caplog.clear()
        await sync.report({"b": 2})
        assert not await sync.wait_sent(3)

    asyncio.run(syncing(fleet, "sync-409-loop", HandlerSet(), body))
    conflicts = caplog.text.count("version conflict")
    assert 2 <= conflicts <= 12, conflicts


@pytest.mark.unit
def test_a_state_folder_that_refuses_the_queue_is_named_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """F4: the write fails (a file where the folder should be: refused even for root). The
    error names the queue file and the cause; the report stays queued in memory, and the next
    save that works writes it."""
    folder = tmp_path / "shadows"
    sync = ShadowSync("t", None, HandlerSet(), FileQueueStore(folder, None))
    folder.write_text("")

    async def main() -> None:
        with pytest.raises(OSError) as refused:
            await sync.report({"a": 1})
        assert str(refused.value) == (
            f"cannot write the report queue {folder / 'classic.pending.json'}: "
            f"File exists: {folder}"
        )
        folder.unlink()
        assert await sync.report({"b": 2})

    asyncio.run(main())
    assert json.loads((folder / "classic.pending.json").read_text())["patches"] == [
        {"a": 1, "b": 2}
    ]


def test_a_write_error_in_the_state_folder_does_not_end_the_sync(fleet: Fleet) -> None:
    """F4: reports are still sent while the folder refuses writes, and the sync goes on."""
    folder = make_workdir() / "shadows"
    store = FileQueueStore(folder, None)
    aside = folder.with_name("aside")

    async def body(sync: ShadowSync) -> None:
        assert await sync.report({"a": 1})
        assert await sync.wait_sent(5)
        folder.rename(aside)
        folder.write_text("")  # no folder any more: every save fails
        with pytest.raises(OSError):
            await sync.report({"b": 2})
        assert await sync.wait_sent(5)  # sent all the same
        await asyncio.sleep(0.2)
        folder.unlink()
        assert await sync.report({"c": 3})
        assert await sync.wait_sent(5)

    asyncio.run(syncing(fleet, "sync-disk", HandlerSet(), body, store))
    assert state_of(fleet, "sync-disk", "reported") == {"a": 1, "b": 2, "c": 3}
