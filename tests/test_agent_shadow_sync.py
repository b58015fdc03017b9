"""The agent's shadow sync against the real stack (Mosquitto + plugin + services).

In-process: `ShadowSync` over a real `Session` with a device certificate, for the sync rules
(apply, report, conflicts, rejections, offline queue). The daemon and the command line are
covered in test_agent_run.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import wire
from agent.handlers import DesiredChange, HandlerSet
from agent.session import Session, connect
from agent.shadow_sync import FileQueueStore, MemoryQueueStore, QueueStore, ShadowSync
from tests.fleet import Client, Fleet, make_workdir, running_fleet


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
) -> ShadowSync:
    """Run ``body`` while a ShadowSync serves ``thing`` over a fresh device session."""
    sync = ShadowSync(thing, None, handlers, store or MemoryQueueStore(), timeout=5)
    session = session or await device_session(fleet, thing)
    sync.attach(session)
    await session.subscribe(*sync.subscriptions())
    serving = asyncio.create_task(sync.serve(session))
    try:
        await body(sync)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await session.disconnect()
    return sync


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


def test_a_damaged_queue_file_is_moved_aside_not_lost(tmp_path: Path) -> None:
    folder = tmp_path / "shadows"
    folder.mkdir()
    (folder / "classic.pending.json").write_text("{not json")
    store = FileQueueStore(folder, None)
    assert not store.load()
    assert (folder / "classic.pending.damaged").read_text() == "{not json"


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
