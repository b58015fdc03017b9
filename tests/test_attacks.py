"""The attacks of issue 15 (an attack run against the landed stack), each as it was made: on the
wire, with credentials an attacker holds (the shared claim of a stolen device, a per-device
claim, a device's own certificate), against the real stack with the services process. Each of
these succeeded before the fix."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from agent import wire
from broker import bootstrap
from broker.registry import CertificateStatus, SharedClaim, ThingStatus
from tests.fleet import Client, Credentials, Fleet, fleet_broker, running_fleet
from tests.test_provisioning import CSR_TOPIC, TEMPLATE, Device, onboard

pytestmark = pytest.mark.stack

NOT_AUTHORIZED = 0x87


def code(reason: object) -> int:
    return reason.value if hasattr(reason, "value") else int(reason)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with running_fleet(services=True) as running:
        yield running


def per_device_claims(fleet: Fleet, batch: str, count: int) -> list[Credentials]:
    issued = bootstrap.issue_claims(fleet.pki.root, name=batch, count=count)
    return [Credentials(cert, key) for cert, key in issued]


def connect_as_thing(fleet: Fleet, device: Device, certificate: dict, thing: str) -> Client:
    creds = device.save_credentials(certificate["certificatePem"], thing)
    client = fleet.client(creds, thing)
    assert client.accepted, client.connack
    return client


def shadow_version(fleet: Fleet, thing: str) -> int | None:
    with fleet.registry() as registry:
        stored = registry.load_shadow(thing, "")
    return None if stored is None else stored.version


# ------------------------------------------- 1. a revoked thing stays out (finding 1)


def test_a_revoked_thing_cannot_be_registered_again_with_the_claim(fleet: Fleet) -> None:
    device, certificate, registered = onboard(fleet, "STOLEN-1")
    thing = registered["thingName"]
    connect_as_thing(fleet, device, certificate, thing).stop()

    result = fleet_broker(fleet, "revoke", thing)
    assert result.returncode == 0, result.stderr
    assert f"revoked thing {thing}" in result.stdout

    # The stolen device still carries the shared claim: it onboards the same serial again.
    thief = Device.connect(fleet, "claim-thief-1")
    fresh = thief.create_certificate()
    outcome, answer = thief.register(fresh["certificateOwnershipToken"], SerialNumber="STOLEN-1")
    assert outcome == "rejected"
    assert answer["statusCode"] == 403 and answer["errorCode"] == "AccessDenied"
    assert thing in answer["errorMessage"] and "things enable" in answer["errorMessage"]
    with fleet.registry() as registry:
        record = registry.get_thing(thing)
        assert record is not None and record.status is ThingStatus.REVOKED
        assert record.revoked_by and "fleet-broker" in record.revoked_by
        assert registry.get_certificate(fresh["certificateId"]).thing_name is None  # type: ignore[union-attr]

    # Until an operator enables it again; that is audited, and then the device onboards.
    enabled = fleet_broker(fleet, "things", "enable", thing)
    assert enabled.returncode == 0, enabled.stderr
    outcome, answer = thief.register(fresh["certificateOwnershipToken"], SerialNumber="STOLEN-1")
    assert outcome == "accepted", answer
    audit = fleet_broker(fleet, "audit")
    assert "revoke-thing" in audit.stdout and "enable-thing" in audit.stdout
    things = fleet_broker(fleet, "things")
    assert any(line.startswith(thing) and "ACTIVE" in line for line in things.stdout.splitlines())


def test_revoke_can_take_the_per_device_claim_but_not_a_shared_one(fleet: Fleet) -> None:
    (claim,) = per_device_claims(fleet, "line-7", 1)
    device = Device.connect(fleet, "claim-line7-1", claim=claim)
    certificate = device.create_certificate()
    outcome, registered = device.register(
        certificate["certificateOwnershipToken"], SerialNumber="LINE7-1"
    )
    assert outcome == "accepted", registered
    revoked = bootstrap.revoke(fleet.pki.root, registered["thingName"], with_claim=True)
    with fleet.registry() as registry:
        claim_id = next(r.id for r in registry.list_certificates() if r.label == "line-7")
    assert claim_id in [r.id for r in revoked]
    assert fleet.client(claim, "claim-line7-again").connack.value == NOT_AUTHORIZED  # type: ignore[union-attr]

    # The shared factory claim onboarded many things: revoking it with one is refused, whole.
    _, _, shared_thing = onboard(fleet, "SHARED-1")
    onboard(fleet, "SHARED-2")
    with pytest.raises(SharedClaim, match="other thing"):
        bootstrap.revoke(fleet.pki.root, shared_thing["thingName"], with_claim=True)
    with fleet.registry() as registry:
        assert registry.get_thing(shared_thing["thingName"]).status is ThingStatus.ACTIVE  # type: ignore[union-attr]
    assert fleet.client(fleet.claim, "claim-still-works").accepted


# ------------------------------------- 2. a claim cannot block a revocation (finding 2)


def test_a_claim_cannot_take_an_operator_client_id(fleet: Fleet) -> None:
    # The attack registered DeviceModel "fleet", SerialNumber "revoke-1" to squat the id
    # `fleet-revoke-<pid>`; operator ids now have a character no thing name has.
    operator_id = wire.operator_client_id("revoke")
    assert wire.THING_NAME_PATTERN.fullmatch(operator_id) is None
    assert code(fleet.client(fleet.claim, operator_id).connack) == NOT_AUTHORIZED
    onboard(fleet, "revoke-1")  # a thing may be called fleet-... as before; it blocks nothing
    operator = fleet.client(fleet.service, operator_id)
    assert operator.accepted


def test_revocation_holds_when_the_kick_is_lost(fleet: Fleet) -> None:
    device, certificate, registered = onboard(fleet, "NOKICK-1")
    thing = registered["thingName"]
    creds = device.save_credentials(certificate["certificatePem"], thing)
    client = fleet.client(creds, thing)
    client.subscribe(wire.thing_filter(thing))
    client.publish(
        wire.shadow_topic(thing, "update"), json.dumps({"state": {"reported": {"a": 1}}})
    )
    assert client.received.wait_for(lambda m: m.topic.endswith("/update/accepted"))
    before = shadow_version(fleet, thing)

    # The registry alone: no kick message, no CRL reload (as if the operator's connection
    # was refused or the message lost).
    with fleet.registry() as registry:
        registry.revoke(thing, actor="test")
    # Anything it sends from now on is refused by the services, until the broker drops it.
    client.publish(
        wire.shadow_topic(thing, "update"), json.dumps({"state": {"reported": {"a": 2}}})
    )
    assert client.disconnected.wait(5), "the broker kept a revoked certificate connected"
    assert shadow_version(fleet, thing) == before
    assert code(fleet.client(creds, thing).connack) == NOT_AUTHORIZED


# ---------------------------------- 3. a pending registration is its claim's (finding 3)


def test_another_claim_cannot_supersede_a_registration_before_first_connect(fleet: Fleet) -> None:
    first, second = per_device_claims(fleet, "pending", 2)
    owner = Device.connect(fleet, "claim-pending-1", claim=first)
    certificate = owner.create_certificate()
    outcome, registered = owner.register(
        certificate["certificateOwnershipToken"], SerialNumber="PEND-1"
    )
    assert outcome == "accepted", registered

    attacker = Device.connect(fleet, "claim-pending-2", claim=second)
    stolen = attacker.create_certificate()
    outcome, answer = attacker.register(stolen["certificateOwnershipToken"], SerialNumber="PEND-1")
    assert outcome == "rejected" and answer["statusCode"] == 409, answer
    # The real device connects as its thing; the attacker's certificate is nobody's.
    assert connect_as_thing(fleet, owner, certificate, registered["thingName"]).accepted
    with fleet.registry() as registry:
        assert registry.get_certificate(stolen["certificateId"]).thing_name is None  # type: ignore[union-attr]

    # The same claim retrying (an onboarding that died before it stored its certificate) may.
    retry_owner = Device.connect(fleet, "claim-pending-3", claim=first)
    c1 = retry_owner.create_certificate()
    assert retry_owner.register(c1["certificateOwnershipToken"], SerialNumber="PEND-2")[0] == (
        "accepted"
    )
    c2 = retry_owner.create_certificate()
    outcome, answer = retry_owner.register(c2["certificateOwnershipToken"], SerialNumber="PEND-2")
    assert outcome == "accepted", answer


# ---------------------------------------------- 5. tokens are not bearer tokens


def test_an_ownership_token_works_only_for_the_certificate_that_asked(fleet: Fleet) -> None:
    first, second = per_device_claims(fleet, "tokens", 2)
    asker = Device.connect(fleet, "claim-token-1", claim=first)
    certificate = asker.create_certificate()
    thief = Device.connect(fleet, "claim-token-2", claim=second)
    outcome, answer = thief.register(certificate["certificateOwnershipToken"], SerialNumber="TOK-1")
    assert outcome == "rejected"
    assert answer["errorCode"] == "InvalidCertificateOwnershipToken"
    outcome, answer = asker.register(certificate["certificateOwnershipToken"], SerialNumber="TOK-1")
    assert outcome == "accepted", answer


# ------------------------------------------------------- 4. one client cannot flood


def test_a_flooding_device_is_throttled_and_others_are_answered(fleet: Fleet) -> None:
    flooder_device, cert_f, reg_f = onboard(fleet, "FLOOD-1")
    flooder = connect_as_thing(fleet, flooder_device, cert_f, reg_f["thingName"])
    flooder.subscribe(wire.thing_filter(reg_f["thingName"]))
    victim_device, cert_v, reg_v = onboard(fleet, "VICTIM-1")
    victim_thing = reg_v["thingName"]
    victim = connect_as_thing(fleet, victim_device, cert_v, victim_thing)
    victim.subscribe(wire.thing_filter(victim_thing))
    before = received_by_services(fleet)

    topic = wire.shadow_topic(reg_f["thingName"], "update")
    done = threading.Event()

    def flood() -> None:
        for i in range(3000):
            if flooder.disconnected.is_set():
                break
            flooder.paho.publish(topic, json.dumps({"state": {"reported": {"n": i}}}), qos=0)
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    answered = 0
    for i in range(20):
        token = f"victim-{i}"
        victim.publish(wire.shadow_topic(victim_thing, "get"), json.dumps({"clientToken": token}))
        reply = victim.received.wait_for(
            lambda m, t=token: (
                m.topic.startswith(wire.shadow_topic(victim_thing, "get"))
                and json.loads(m.payload).get("clientToken") == t
            ),
            timeout=10,
        )
        answered += reply is not None
    assert done.wait(30)
    assert answered == 20
    # 1,000 requests over the quota within 10 s: disconnected (DISCONNECT 0x98).
    assert flooder.disconnected.wait(5)
    # The services never saw most of the flood (the quota is 100/s with a burst of 100).
    time.sleep(1.5)
    assert received_by_services(fleet) - before < 1500


def test_requests_over_the_quota_get_a_429_on_their_rejected_topic(fleet: Fleet) -> None:
    device, certificate, registered = onboard(fleet, "BURST-1")
    thing = registered["thingName"]
    client = connect_as_thing(fleet, device, certificate, thing)
    client.subscribe(wire.thing_filter(thing))
    topic = wire.shadow_topic(thing, "get")
    for i in range(300):  # over the burst, under the disconnect threshold
        client.paho.publish(topic, json.dumps({"clientToken": f"t{i}"}), qos=0)
    throttled = client.received.wait_for(
        lambda m: (
            m.topic == wire.shadow_reply(thing, "get", "rejected")
            and json.loads(m.payload)["code"] == 429
        )
    )
    assert throttled is not None
    answer = json.loads(throttled.payload)
    assert answer["message"] == "Too Many Requests" and answer["clientToken"].startswith("t")
    assert not client.disconnected.is_set()


def received_by_services(fleet: Fleet) -> int:
    """The services' own count of requests received, from their stats topic."""
    reader = fleet.client(fleet.service, wire.operator_client_id("stats"))
    reader.subscribe(wire.SERVICE_STATS_TOPIC)
    message = reader.received.wait_for(lambda m: m.topic == wire.SERVICE_STATS_TOPIC, timeout=5)
    reader.stop()
    assert message is not None
    return int(json.loads(message.payload)["requests_received"])


# -------------------------------------------------- 6. QoS 2 requests are refused


def test_a_qos2_request_is_refused_and_never_applied(fleet: Fleet) -> None:
    # AWS IoT has no QoS 2, and Mosquitto runs the plugin before its duplicate check, so a
    # QoS 2 request resent with DUP after a reconnect would be applied twice: refused
    # (PUBREC 0x87; paho goes on to PUBREL/PUBCOMP regardless, so the proof is the shadow).
    device, certificate, registered = onboard(fleet, "QOS2-1")
    thing = registered["thingName"]
    client = connect_as_thing(fleet, device, certificate, thing)
    client.subscribe(wire.thing_filter(thing))
    update = json.dumps({"state": {"reported": {"q": 2}}})
    client.publish(wire.shadow_topic(thing, "update"), update, qos=2)
    client.publish(wire.shadow_topic(thing, "update"), update, qos=1)  # the control
    assert client.received.wait_for(lambda m: m.topic.endswith("/update/accepted"))
    time.sleep(0.3)
    assert shadow_version(fleet, thing) == 1
    assert [t for t in client.received.topics() if t.endswith("/update/accepted")] == [
        wire.shadow_reply(thing, "update", "accepted")
    ]


# --------------------------------------------------------------------- 7. the rest


def test_a_retained_will_on_a_request_topic_never_sticks(fleet: Fleet) -> None:
    device, certificate, registered = onboard(fleet, "WILL-1")
    thing = registered["thingName"]
    creds = device.save_credentials(certificate["certificatePem"], thing)
    topic = wire.shadow_topic(thing, "update")
    client = fleet.client(creds, thing, will=(topic, b'{"state":{}}', []), will_retain=True)
    client.drop()
    time.sleep(0.5)
    reader = fleet.client(fleet.service, wire.operator_client_id("will-check"))
    reader.subscribe(topic)
    time.sleep(0.5)
    assert reader.received.topics() == []


def test_a_deeply_nested_request_is_a_400_with_one_log_line(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-nested")
    outcome, answer = device.request(CSR_TOPIC, b"[" * 30000 + b"]" * 30000)
    assert outcome == "rejected" and answer["statusCode"] == 400, answer
    log = fleet.stack.files.services_log.read_text()
    assert "RecursionError" not in log and "Traceback" not in log


def test_an_empty_named_shadow_is_rejected_on_its_own_topic(fleet: Fleet) -> None:
    device, certificate, registered = onboard(fleet, "NONAME-1")
    thing = registered["thingName"]
    client = connect_as_thing(fleet, device, certificate, thing)
    client.subscribe(wire.thing_filter(thing))
    client.publish(f"$aws/things/{thing}/shadow/name//update", b'{"state":{"reported":{}}}')
    reply = client.received.wait_for(lambda m: m.topic.endswith("/rejected"))
    assert reply is not None
    assert reply.topic == f"$aws/things/{thing}/shadow/name//update/rejected"


def test_a_thing_name_without_letters_or_digits_is_refused(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-dash")
    certificate = device.create_certificate()
    outcome, answer = device.register(
        certificate["certificateOwnershipToken"], TEMPLATE, SerialNumber="", DeviceModel=""
    )
    assert outcome == "rejected" and answer["statusCode"] == 400, answer
    assert "'-'" in answer["errorMessage"]


def test_a_claim_learns_nothing_about_thing_names_from_its_connack(fleet: Fleet) -> None:
    onboard(fleet, "SECRET-1")
    existing = fleet.client(fleet.claim, "generic-SECRET-1")
    absent = fleet.client(fleet.claim, "generic-NOBODY-1")
    assert code(existing.connack) == code(absent.connack) == NOT_AUTHORIZED
    assert fleet.client(fleet.claim, "claim-anything").accepted


def test_a_claim_request_from_a_certificate_no_longer_active_is_refused(fleet: Fleet) -> None:
    (claim,) = per_device_claims(fleet, "late", 1)
    device = Device.connect(fleet, "claim-late-1", claim=claim)
    with fleet.registry() as registry:
        claim_id = next(r.id for r in registry.list_certificates() if r.label == "late")
        registry.set_certificate_status(claim_id, CertificateStatus.INACTIVE)
    # Before the broker's sweep drops the connection, a request may still be forwarded: the
    # services refuse it; afterwards there is no connection to send it on.
    device.client.publish(CSR_TOPIC, json.dumps({"certificateSigningRequest": device.csr_pem()}))
    reply = device.client.received.wait_for(lambda m: m.topic.startswith(CSR_TOPIC), timeout=2)
    if reply is not None:
        assert reply.topic.endswith("/rejected") and json.loads(reply.payload)["statusCode"] == 403
    assert device.client.disconnected.wait(5)
