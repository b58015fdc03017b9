"""The Device Shadow service against the real stack: devices are paho clients with their own
certificates; the operator is a service-identity client."""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from agent import wire
from broker.identity import Sender
from broker.mqtt import ConnectError
from broker.mqtt5_client import encode_varint, read_varint
from broker.registry import CertificateStatus, ShadowStore, SQLiteRegistry, StoredShadow
from broker.service_connection import ServiceConnection
from broker.shadow_service import ShadowService
from tests.fleet import Client, Fleet, running_fleet

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with running_fleet(services=True) as running:
        yield running


def device(fleet: Fleet, thing: str) -> Client:
    client = fleet.client(fleet.device(thing), thing)
    assert client.accepted
    client.subscribe(f"$aws/things/{thing}/shadow/#")
    return client


def request(
    client: Client,
    topic: str,
    document: object | None = None,
    *,
    qos: int = 1,
    timeout: float = 5,
) -> tuple[str, dict]:
    """Publish a shadow request; return (reply topic suffix, payload) of its answer."""
    token = f"t-{time.monotonic_ns()}"
    body = {} if document is None else dict(document)  # type: ignore[call-overload]
    body["clientToken"] = token
    client.publish(topic, json.dumps(body), qos=qos)
    reply = client.received.wait_for(
        lambda m: (
            m.topic.startswith(topic + "/")
            and m.topic.rsplit("/", 1)[1] in ("accepted", "rejected")
            and json.loads(m.payload).get("clientToken") == token
        ),
        timeout=timeout,
    )
    assert reply is not None, f"no reply to {topic}"
    return reply.topic.rsplit("/", 1)[1], json.loads(reply.payload)


def test_desired_change_reaches_the_device_as_a_delta_and_empties_once_reported(
    fleet: Fleet,
) -> None:
    lamp = device(fleet, "lamp-1")
    operator = fleet.client(fleet.service, "operator-lamp")
    operator.subscribe("$aws/things/lamp-1/shadow/#")
    update = wire.shadow_topic("lamp-1", "update")
    assert request(lamp, update, {"state": {"reported": {"on": False, "lux": 10}}})[0] == "accepted"
    outcome, accepted = request(operator, update, {"state": {"desired": {"on": True}}})
    assert outcome == "accepted" and accepted["version"] == 2
    delta = lamp.received.wait_for(lambda m: m.topic == wire.shadow_delta("lamp-1"))
    assert delta is not None and json.loads(delta.payload)["state"] == {"on": True}
    request(lamp, update, {"state": {"reported": {"on": True}}})
    outcome, shadow = request(lamp, wire.shadow_topic("lamp-1", "get"))
    assert outcome == "accepted"
    assert "delta" not in shadow["state"]
    assert shadow["state"]["reported"] == {"on": True, "lux": 10}
    assert shadow["version"] == 3


def test_named_shadows_are_separate(fleet: Fleet) -> None:
    pump = device(fleet, "pump-1")
    request(
        pump, wire.shadow_topic("pump-1", "update", "config"), {"state": {"reported": {"a": 1}}}
    )
    outcome, answer = request(pump, wire.shadow_topic("pump-1", "get"))
    assert outcome == "rejected" and answer["code"] == 404
    outcome, answer = request(pump, wire.shadow_topic("pump-1", "get", "config"))
    assert outcome == "accepted" and answer["state"]["reported"] == {"a": 1}


def test_rejections_echo_the_client_token(fleet: Fleet) -> None:
    meter = device(fleet, "meter-1")
    update = wire.shadow_topic("meter-1", "update")
    outcome, answer = request(meter, update, {"nostate": True})
    assert (outcome, answer["code"]) == ("rejected", 400)
    request(meter, update, {"state": {"reported": {"x": 1}}})
    outcome, answer = request(meter, update, {"state": {"reported": {"x": 2}}, "version": 99})
    assert (outcome, answer["code"], answer["message"]) == ("rejected", 409, "Version conflict")
    outcome, answer = request(meter, update, {"state": {"reported": {"blob": "x" * 9000}}})
    assert (outcome, answer["code"]) == ("rejected", 413)
    outcome, answer = request(meter, update, {"state": {"reported": {"x": 3}}, "version": 1})
    assert outcome == "accepted" and answer["version"] == 2


def test_delete_then_recreate_continues_the_version(fleet: Fleet) -> None:
    sensor = device(fleet, "sensor-1")
    update = wire.shadow_topic("sensor-1", "update")
    for value in range(3):
        request(sensor, update, {"state": {"reported": {"v": value}}})
    outcome, deleted = request(sensor, wire.shadow_topic("sensor-1", "delete"))
    assert outcome == "accepted" and deleted["version"] == 3
    outcome, answer = request(sensor, wire.shadow_topic("sensor-1", "get"))
    assert outcome == "rejected" and answer["message"] == "No shadow exists with name: 'sensor-1'"
    outcome, answer = request(sensor, update, {"state": {"reported": {"v": 9}}})
    assert outcome == "accepted" and answer["version"] == 4


def test_device_cannot_read_or_write_another_things_shadow(fleet: Fleet) -> None:
    owner = device(fleet, "vault-1")
    request(owner, wire.shadow_topic("vault-1", "update"), {"state": {"reported": {"k": 1}}})
    thief = device(fleet, "thief-1")
    info = thief.publish(wire.shadow_topic("vault-1", "get"), b"{}")
    assert thief.puback(info).value == 0x87  # type: ignore[attr-defined]
    assert thief.subscribe(wire.shadow_reply("vault-1", "get", "accepted"))[0].value == 0x87


def test_shadow_survives_a_restart_of_the_whole_stack(fleet: Fleet) -> None:
    clock = device(fleet, "clock-1")
    request(clock, wire.shadow_topic("clock-1", "update"), {"state": {"reported": {"t": 42}}})
    clock.stop()
    fleet.stack.stop()
    fleet.stack.start()
    again = device(fleet, "clock-1")
    outcome, answer = request(again, wire.shadow_topic("clock-1", "get"))
    assert outcome == "accepted" and answer["state"]["reported"] == {"t": 42}


def test_a_burst_of_updates_is_applied_in_order_with_every_reply(fleet: Fleet) -> None:
    """Far more replies than the broker's Receive Maximum (20) in flight, requests handled in
    batches: every update is answered, in order, each with the next version."""
    fan = device(fleet, "fan-1")
    update = wire.shadow_topic("fan-1", "update")
    count = 100  # the per-connection burst; beyond it the broker answers 429 (test_attacks.py)
    for n in range(count):  # back to back, no waiting for any answer
        body = {"state": {"reported": {"n": n}}, "clientToken": f"burst-{n}"}
        fan.paho.publish(update, json.dumps(body), qos=1)
    accepted_topic = wire.shadow_reply("fan-1", "update", "accepted")
    documents_topic = wire.shadow_documents("fan-1")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if fan.received.topics().count(documents_topic) == count:
            break
        time.sleep(0.05)
    with fan.received.event:
        messages = list(fan.received.messages)
    accepted = [json.loads(m.payload) for m in messages if m.topic == accepted_topic]
    documents = [json.loads(m.payload) for m in messages if m.topic == documents_topic]
    assert [a["clientToken"] for a in accepted] == [f"burst-{n}" for n in range(count)]
    assert [a["version"] for a in accepted] == list(range(1, count + 1))
    assert [d["current"]["state"]["reported"]["n"] for d in documents] == list(range(count))
    for before, after in itertools.pairwise(documents):
        assert after["previous"] == before["current"]


# QoS 2 requests are refused by the broker (AWS IoT has none, and Mosquitto would apply a
# resent one twice): tests/test_attacks.py::test_a_qos2_request_is_refused_and_never_applied.


def test_services_reconnect_by_themselves_after_a_broker_restart(fleet: Fleet) -> None:
    """Only Mosquitto restarts: the services notice, reconnect to their persistent session and
    answer again (a request sent before they are back waits in that session)."""
    fleet.close_clients()
    fleet.stack.broker.stop()
    fleet.stack.broker.start()
    fleet.stack.broker.wait_listening()
    door = device(fleet, "door-1")  # quite possibly before the services are back
    update = wire.shadow_topic("door-1", "update")
    outcome, answer = request(door, update, {"state": {"reported": {"open": True}}}, timeout=15)
    assert outcome == "accepted" and answer["version"] == 1
    assert "reconnected to the broker" in fleet.stack.files.services_log.read_text()


def test_the_services_connection_keeps_alive_and_publishes(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = device(fleet, "bell-1")
    connection = ServiceConnection(
        "127.0.0.1",
        fleet.config.port,
        context=fleet.tls(fleet.service),
        client_id="keepalive-probe",
        on_batch=lambda _batch: None,
        keepalive=1,
    )
    connection.start()
    try:
        time.sleep(2.5)  # a PINGREQ every half keepalive, each answered
        topic = wire.shadow_delta("bell-1")
        connection.publish(topic, b'{"state":{"ring":true}}')
        assert watcher.received.wait_for(lambda m: m.topic == topic) is not None
    finally:
        connection.stop()
    assert not [r for r in caplog.records if r.name == "fleet.mqtt"]


def test_the_services_connection_says_why_it_was_refused(fleet: Fleet) -> None:
    """A device certificate may not use the services' client id: CONNACK Not authorized."""
    impostor = ServiceConnection(
        "127.0.0.1",
        fleet.config.port,
        context=fleet.tls(fleet.device("imp-1")),
        client_id=fleet.config.services_client_id,
        on_batch=lambda _batch: None,
    )
    with pytest.raises(ConnectError, match="refused the connection: Not authorized"):
        impostor.start()


# The AWS SDK's shadow client against this service: tests/awsiotsdk_cases.py, run in a
# process of its own by tests/test_interop_awsiotsdk.py.


# ------------------------------------------------------ batches, storage and replies (no broker)

DEVICE = "dev-1"


def _sender(thing: str) -> Sender:
    return Sender(f"{thing}", "1", "device", SENDER_CERTIFICATE, thing)


def _update(thing: str, value: int, token: str) -> tuple[str, bytes, Sender]:
    body = {"state": {"reported": {"v": value}}, "clientToken": token}
    return wire.shadow_topic(thing, "update"), json.dumps(body).encode(), _sender(thing)


def _accepted(replies: list[tuple[str, bytes]]) -> list[tuple[str, int]]:
    """(thing, version) of every /update/accepted, in publish order."""
    return [
        (topic.split("/")[2], json.loads(payload)["version"])
        for topic, payload in replies
        if topic.endswith("/update/accepted")
    ]


SENDER_CERTIFICATE = "c" * 64  # what every _sender stamps


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SQLiteRegistry]:
    with SQLiteRegistry.open(tmp_path / "registry.db") as opened:
        # The service acts only on stamps of ACTIVE certificates: register the one _sender
        # uses (a row as the plugin reads it; no real certificate needed for shadow rules).
        with sqlite3.connect(opened.path) as db:
            db.execute(
                "INSERT INTO certificates (id, pem, serial, role, status, not_after, created_at,"
                " updated_at) VALUES (?, '', '1', 'device', 'ACTIVE', 0, 0, 0)",
                (SENDER_CERTIFICATE,),
            )
        yield opened


@pytest.mark.unit
def test_a_request_stamped_with_a_certificate_no_longer_active_is_refused(
    registry: SQLiteRegistry,
) -> None:
    replies: list[tuple[str, bytes]] = []
    registry.set_certificate_status(SENDER_CERTIFICATE, CertificateStatus.REVOKED)
    ShadowService(registry).handle_batch(
        [_update("a", 1, "a1")], lambda t, p: replies.append((t, p))
    )
    assert [(t, json.loads(p)["code"]) for t, p in replies] == [
        (wire.shadow_reply("a", "update", "rejected"), 403)
    ]
    assert registry.load_shadow("a", "") is None


@pytest.mark.unit
def test_a_batch_applies_each_things_updates_in_arrival_order(registry: SQLiteRegistry) -> None:
    replies: list[tuple[str, bytes]] = []
    batch = [
        _update("a", 1, "a1"),
        _update("b", 1, "b1"),
        _update("a", 2, "a2"),
        (wire.shadow_topic("a", "get"), b"{}", _sender("a")),
        _update("a", 3, "a3"),
    ]
    ShadowService(registry).handle_batch(batch, lambda t, p: replies.append((t, p)))
    assert _accepted(replies) == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    got = next(json.loads(p) for t, p in replies if t.endswith("/get/accepted"))
    assert (got["version"], got["state"]["reported"]) == (2, {"v": 2})  # sees the batch's writes
    stored = registry.load_shadow("a", "")
    assert stored is not None and stored.version == 3


@pytest.mark.unit
def test_no_reply_is_published_before_its_write_is_committed(registry: SQLiteRegistry) -> None:
    """Every /update/accepted finds its version in the database, read from another connection."""
    observer = sqlite3.connect(registry.path)
    seen: list[tuple[int, int]] = []

    def publish(topic: str, payload: bytes) -> None:
        if topic.endswith("/update/accepted"):
            thing = topic.split("/")[2]
            row = observer.execute(
                "SELECT version FROM shadows WHERE thing_name = ? AND shadow_name = ''", (thing,)
            ).fetchone()
            seen.append((json.loads(payload)["version"], row[0] if row else 0))

    service = ShadowService(registry)
    service.handle_batch([_update("a", n, f"t{n}") for n in range(5)], publish)
    observer.close()
    assert seen and all(stored >= announced for announced, stored in seen)


class _FullDiskFor:
    """A registry on which writing ``thing``'s shadow fails, as on a full disk."""

    def __init__(self, registry: SQLiteRegistry, thing: str) -> None:
        self._registry = registry
        self._thing = thing
        self.transactions = 0

    def not_active(self, certificate_ids: Iterable[str]) -> set[str]:
        return self._registry.not_active(certificate_ids)

    @contextlib.contextmanager
    def shadow_transaction(self) -> Iterator[ShadowStore]:
        self.transactions += 1
        with self._registry.shadow_transaction() as store:
            yield _FailingStore(store, self._thing)


class _FailingStore:
    def __init__(self, store: ShadowStore, thing: str) -> None:
        self._store, self._thing = store, thing

    def load(self, thing_name: str, shadow_name: str) -> StoredShadow | None:
        return self._store.load(thing_name, shadow_name)

    def save(self, thing_name: str, shadow_name: str, document: str, version: int) -> None:
        if thing_name == self._thing:
            raise sqlite3.OperationalError("database or disk is full")
        self._store.save(thing_name, shadow_name, document, version)

    def delete(self, thing_name: str, shadow_name: str, version: int) -> None:
        self._store.delete(thing_name, shadow_name, version)


@pytest.mark.unit
def test_a_failed_write_costs_only_its_own_request_an_answer(registry: SQLiteRegistry) -> None:
    """The batch's transaction fails and rolls back; retried one by one, the others are
    accepted once each and the failing one gets a 500, never an accepted."""
    failing = _FullDiskFor(registry, "bad")
    replies: list[tuple[str, bytes]] = []
    batch = [_update("a", 1, "a1"), _update("bad", 1, "x"), _update("b", 1, "b1")]
    batch.append(_update("a", 2, "a2"))
    service = ShadowService(failing)  # type: ignore[arg-type]
    service.handle_batch(batch, lambda t, p: replies.append((t, p)))
    assert failing.transactions == 1 + len(batch)
    assert _accepted(replies) == [("a", 1), ("b", 1), ("a", 2)]
    rejected = [
        (t.split("/")[2], json.loads(p)["code"]) for t, p in replies if t.endswith("/rejected")
    ]
    assert rejected == [("bad", 500)]
    assert registry.load_shadow("bad", "") is None
    stored = registry.load_shadow("a", "")
    assert stored is not None and stored.version == 2


@pytest.mark.unit
@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455])
def test_variable_byte_integers_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert read_varint(encoded, 0, len(encoded)) == (value, len(encoded))
    assert read_varint(encoded, 0, len(encoded) - 1) is None  # incomplete: wait for more bytes
