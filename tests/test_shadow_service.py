"""The Device Shadow service against the real stack: devices are paho clients with their own
certificates; the operator is a service-identity client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from awscrt import mqtt_request_response
from awsiot import V2ServiceException, iotshadow, mqtt5_client_builder

from agent import wire
from tests.fleet import Client, Fleet, running_fleet


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with running_fleet(services=True) as running:
        yield running


def device(fleet: Fleet, thing: str) -> Client:
    client = fleet.client(fleet.device(thing), thing)
    assert client.accepted
    client.subscribe(f"$aws/things/{thing}/shadow/#")
    return client


def request(client: Client, topic: str, document: object | None = None) -> tuple[str, dict]:
    """Publish a shadow request; return (reply topic suffix, payload) of its answer."""
    token = f"t-{time.monotonic_ns()}"
    body = {} if document is None else dict(document)  # type: ignore[call-overload]
    body["clientToken"] = token
    client.publish(topic, json.dumps(body))
    reply = client.received.wait_for(
        lambda m: (
            m.topic.startswith(topic + "/")
            and m.topic.rsplit("/", 1)[1] in ("accepted", "rejected")
            and json.loads(m.payload).get("clientToken") == token
        ),
        timeout=5,
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


# ----------------------------------------------------------------- AWS SDK interoperability


def test_aws_sdk_shadow_client_against_our_service(fleet: Fleet) -> None:
    creds = fleet.device("sdk-thing")
    connected = [False]
    client = mqtt5_client_builder.mtls_from_path(
        endpoint="localhost",
        port=fleet.config.port,
        ca_filepath=str(fleet.pki.ca_cert),
        cert_filepath=str(creds.cert),
        pri_key_filepath=str(creds.key),
        client_id="sdk-thing",
        enable_metrics_collection=False,
        on_lifecycle_connection_success=lambda _e: connected.__setitem__(0, True),
    )
    client.start()
    try:
        deadline = time.monotonic() + 10
        while not connected[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connected[0]
        shadow = iotshadow.IotShadowClientV2(
            client, mqtt_request_response.ClientOptions(4, 2, operation_timeout_in_seconds=10)
        )
        with pytest.raises(V2ServiceException) as missing:
            shadow.get_shadow(iotshadow.GetShadowRequest(thing_name="sdk-thing")).result(10)
        assert missing.value.modeled_error.code == 404
        deltas: list[iotshadow.ShadowDeltaUpdatedEvent] = []
        stream = shadow.create_shadow_delta_updated_stream(
            iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name="sdk-thing"),
            _stream_options(deltas),
        )
        stream.open()
        time.sleep(0.5)
        updated = shadow.update_shadow(
            iotshadow.UpdateShadowRequest(
                thing_name="sdk-thing",
                state=iotshadow.ShadowState(desired={"color": "red"}, reported={"color": "blue"}),
            )
        ).result(10)
        assert updated.version == 1
        got = shadow.get_shadow(iotshadow.GetShadowRequest(thing_name="sdk-thing")).result(10)
        assert got.state.delta == {"color": "red"}
        deadline = time.monotonic() + 5
        while not deltas and time.monotonic() < deadline:
            time.sleep(0.05)
        assert deltas and deltas[0].state == {"color": "red"}
        deleted = shadow.delete_shadow(
            iotshadow.DeleteShadowRequest(thing_name="sdk-thing")
        ).result(10)
        assert deleted.version == 1
    finally:
        client.stop()


def _stream_options(sink: list) -> object:
    import awsiot

    return awsiot.ServiceStreamOptions(incoming_event_listener=sink.append)
