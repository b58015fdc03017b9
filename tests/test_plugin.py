"""The enforcement plugin's outcomes, each proven with real clients against a real broker.

The module's broker runs without the services process: the test itself connects with the
service identity and client id, as the services would.
"""

from __future__ import annotations

import json
import socket
import ssl
import time

import paho.mqtt.client as mqtt
import pytest

from agent import wire
from broker.identity import sender_of
from broker.pki import CertificateAuthority
from broker.registry import CertificateRole, CertificateStatus
from tests.fleet import Client, Credentials, Fleet

pytestmark = pytest.mark.stack

CSR_TOPIC = wire.create_certificate_from_csr()
CSR_ACCEPTED = wire.reply(CSR_TOPIC, "accepted")

NOT_AUTHORIZED_V5 = 0x87
NOT_AUTHORIZED_V311 = 0x80  # SUBACK failure in MQTT 3.1.1


def code(reason: object) -> int:
    return reason.value if hasattr(reason, "value") else int(reason)  # type: ignore[arg-type]


def user_properties(message: mqtt.MQTTMessage) -> dict[str, str]:
    return dict(getattr(message.properties, "UserProperty", None) or [])


def client_id_of(message: mqtt.MQTTMessage) -> str | None:
    stamp = sender_of(message)
    return stamp.client_id if stamp else None


def stays_connected(*clients: Client, seconds: float = 0.5) -> bool:
    time.sleep(seconds)
    return all(c.accepted and not c.disconnected.is_set() for c in clients)


# ---------------------------------------------------------- 1. client id bound to identity


def test_device_connects_only_with_its_thing_name(fleet: Fleet) -> None:
    creds = fleet.device("thermo-1")
    assert fleet.client(creds, "thermo-1").accepted
    refused = fleet.client(creds, "thermo-2")
    assert code(refused.connack) == NOT_AUTHORIZED_V5


def test_identity_is_the_attached_thing_not_the_subject(fleet: Fleet) -> None:
    # A CSR subject is the device's to choose; it must not grant anything.
    creds = fleet.device("pump-7", common_name="pump-8")
    assert code(fleet.client(creds, "pump-8").connack) == NOT_AUTHORIZED_V5
    device = fleet.client(creds, "pump-7")
    assert device.accepted
    assert code(device.subscribe(wire.shadow_delta("pump-7"))[0]) == 1
    assert code(device.subscribe(wire.shadow_delta("pump-8"))[0]) == NOT_AUTHORIZED_V5


def test_refused_impostor_does_not_kick_the_real_device(fleet: Fleet) -> None:
    victim = fleet.client(fleet.device("valve-1"), "valve-1")
    impostor = fleet.client(fleet.device("valve-2"), "valve-1")
    assert code(impostor.connack) == NOT_AUTHORIZED_V5
    assert stays_connected(victim)


@pytest.mark.parametrize(
    "status",
    [CertificateStatus.PENDING_ACTIVATION, CertificateStatus.INACTIVE, CertificateStatus.REVOKED],
)
def test_certificate_that_is_not_active_is_refused(fleet: Fleet, status: CertificateStatus) -> None:
    thing = f"dormant-{status.value.lower()}"
    creds = fleet.device(thing, status=status)
    assert code(fleet.client(creds, thing).connack) == NOT_AUTHORIZED_V5


def test_unregistered_certificate_from_our_ca_is_refused(fleet: Fleet) -> None:
    creds = fleet.identity(CertificateRole.DEVICE, register=False)
    assert code(fleet.client(creds, "ghost").connack) == NOT_AUTHORIZED_V5


def test_device_certificate_without_thing_is_refused(fleet: Fleet) -> None:
    creds = fleet.identity(CertificateRole.DEVICE)  # registered, attached to nothing
    assert code(fleet.client(creds, "loose").connack) == NOT_AUTHORIZED_V5


def test_device_cannot_take_the_services_client_id(fleet: Fleet) -> None:
    service = fleet.as_service()
    creds = fleet.device(fleet.config.services_client_id)
    impostor = fleet.client(creds, fleet.config.services_client_id)
    assert code(impostor.connack) == NOT_AUTHORIZED_V5
    assert stays_connected(service)


# ------------------------------------------------------------ 2. shared claim certificate


def test_200_claim_connections_with_one_shared_certificate_stay_up(fleet: Fleet) -> None:
    clients = [fleet.client(fleet.claim, f"claim-{i:03d}") for i in range(200)]
    assert sum(c.accepted for c in clients) == 200
    assert stays_connected(*clients, seconds=1.0)


# -------------------------------------------------------------------- 3. no takeover


def test_claim_cannot_take_over_a_connected_device(fleet: Fleet) -> None:
    device = fleet.client(fleet.device("meter-1"), "meter-1")
    squatter = fleet.client(fleet.claim, "meter-1")
    assert code(squatter.connack) == NOT_AUTHORIZED_V5
    assert stays_connected(device)


def test_claim_cannot_take_over_another_claim_connection(fleet: Fleet) -> None:
    first = fleet.client(fleet.claim, "claim-onboarding-42")
    second = fleet.client(fleet.claim, "claim-onboarding-42")
    assert code(second.connack) == NOT_AUTHORIZED_V5
    assert stays_connected(first)


def test_claim_cannot_take_an_offline_devices_persistent_session(fleet: Fleet) -> None:
    creds = fleet.device("sleepy-1")
    device = fleet.client(creds, "sleepy-1", clean_start=False, session_expiry=3600)
    device.stop()
    assert code(fleet.client(fleet.claim, "sleepy-1").connack) == NOT_AUTHORIZED_V5


def test_claim_cannot_use_the_services_client_id(fleet: Fleet) -> None:
    squatter = fleet.client(fleet.claim, fleet.config.services_client_id)
    assert code(squatter.connack) == NOT_AUTHORIZED_V5


def test_device_reconnecting_takes_over_its_own_session(fleet: Fleet) -> None:
    creds = fleet.device("roamer-1")
    old = fleet.client(creds, "roamer-1")
    new = fleet.client(creds, "roamer-1")
    assert new.accepted
    assert old.disconnected.wait(2)


# -------------------------------------------------------- 4. per-connection routing


def test_request_reaches_the_service_stamped_with_the_true_sender(fleet: Fleet) -> None:
    service = fleet.as_service()
    alice = fleet.client(fleet.claim, "claim-alice")
    fleet.client(fleet.claim, "claim-bob")
    alice.publish(
        CSR_TOPIC,
        b'{"certificateSigningRequest": "..."}',
        user_properties=[
            ("fleet-sender", "1 service 00 - claim-bob"),
            ("fleet-reply-to", "claim-bob"),
        ],
    )
    request = service.received.wait_for(lambda m: m.topic == CSR_TOPIC)
    assert request is not None
    stamp = sender_of(request)
    assert stamp is not None
    assert stamp.client_id == "claim-alice"
    assert stamp.role == "claim"
    assert stamp.certificate_id == fleet.claim_certificate_id
    assert stamp.thing is None
    # The forged values are gone, not merely shadowed: exactly one stamp, the plugin's.
    names = [name for name, _ in request.properties.UserProperty]
    assert names.count("fleet-sender") == 1 and "fleet-reply-to" not in names


def test_reply_reaches_only_the_connection_that_asked(fleet: Fleet) -> None:
    service = fleet.as_service()
    alice = fleet.client(fleet.claim, "claim-alice-2")
    bob = fleet.client(fleet.claim, "claim-bob-2")
    for c in (alice, bob):
        assert code(c.subscribe(CSR_ACCEPTED)[0]) == 1
    alice.publish(CSR_TOPIC, b"{}")
    request = service.received.wait_for(lambda m: m.topic == CSR_TOPIC)
    assert request is not None
    stamp = sender_of(request)
    assert stamp is not None
    reply = json.dumps({"certificateOwnershipToken": "secret-for-alice"})
    service.publish(
        CSR_ACCEPTED,
        reply,
        user_properties=[
            (wire.PROPERTY_REPLY_TO, stamp.client_id),
            (wire.PROPERTY_CONNECTION, stamp.connection),
        ],
    )
    got = alice.received.wait_for(lambda m: m.topic == CSR_ACCEPTED)
    assert got is not None and got.payload == reply.encode()
    assert not any(k.startswith("fleet-") for k in user_properties(got))
    time.sleep(0.3)
    assert bob.received.topics() == []


def test_reply_to_a_connection_that_is_gone_is_dropped(fleet: Fleet) -> None:
    service = fleet.as_service()
    first = fleet.client(fleet.claim, "claim-flaky-1")
    first.publish(CSR_TOPIC, b"{}")
    request = service.received.wait_for(
        lambda m: m.topic == CSR_TOPIC and client_id_of(m) == "claim-flaky-1"
    )
    assert request is not None
    first.stop()
    # Someone else now holds the same client id: the old connection's reply is not theirs.
    second = fleet.client(fleet.claim, "claim-flaky-1")
    second.subscribe(CSR_ACCEPTED)
    service.publish(
        CSR_ACCEPTED,
        b'{"certificateOwnershipToken": "not-yours"}',
        user_properties=[
            (wire.PROPERTY_REPLY_TO, "claim-flaky-1"),
            (wire.PROPERTY_CONNECTION, sender_of(request).connection),  # type: ignore[union-attr]
        ],
    )
    time.sleep(0.5)
    assert second.received.topics() == []


def test_provisioning_reply_broadcast_reaches_no_claim_client(fleet: Fleet) -> None:
    service = fleet.as_service()
    listener = fleet.client(fleet.claim, "claim-eavesdropper")
    assert code(listener.subscribe(CSR_ACCEPTED)[0]) == 1  # the AWS SDK needs the grant
    service.publish(CSR_ACCEPTED, b'{"certificateOwnershipToken": "broadcast"}')
    time.sleep(0.5)
    assert listener.received.topics() == []


def test_requests_are_never_broadcast_or_retained(fleet: Fleet) -> None:
    service = fleet.as_service()
    sender = fleet.client(fleet.claim, "claim-retainer")
    # A retained request is refused outright (a retained Will there would stick for good).
    refused = sender.publish(CSR_TOPIC, b"{}", retain=True)
    assert code(sender.puback(refused)) == NOT_AUTHORIZED_V5
    sender.publish(CSR_TOPIC, b"{}")
    request = service.received.wait_for(lambda m: client_id_of(m) == "claim-retainer")
    assert request is not None and not request.retain
    # A fresh subscriber with every right there is (the service identity) sees no retained copy.
    late = fleet.client(fleet.service, "late-reader")
    late.subscribe(CSR_TOPIC)
    late.subscribe("$fleet/#")
    time.sleep(0.3)
    assert late.received.topics() == []


# ------------------------------------------------------------ 5. SUBSCRIBE refusals


@pytest.mark.parametrize(
    "topic_filter",
    [
        "$aws/things/someone-else/shadow/update/delta",
        "$aws/things/+/shadow/update/delta",
        "$aws/things/#",
        "#",
        "$aws/certificates/create-from-csr/json",  # other devices' requests
        "$share/g/$aws/things/someone-else/shadow/update/accepted",
        "$SYS/#",
        "$fleet/#",
        wire.SERVICE_STATS_TOPIC,  # the services' queue depths are for operators only
    ],
)
def test_device_subscribe_outside_its_policy_is_refused(fleet: Fleet, topic_filter: str) -> None:
    device = fleet.client(fleet.device("nosy-1"), "nosy-1")
    assert code(device.subscribe(topic_filter)[0]) == NOT_AUTHORIZED_V5


@pytest.mark.parametrize(
    "topic_filter",
    [
        "$aws/things/nosy-2/shadow/update/delta",
        "$aws/things/nosy-2/shadow/get/+",  # what the AWS SDK v2 subscribes
        "$aws/things/nosy-2/shadow/name/+/update/accepted",
        "$aws/things/nosy-2/shadow/#",
        CSR_ACCEPTED,  # renewal replies
    ],
)
def test_device_subscribe_inside_its_policy_is_granted(fleet: Fleet, topic_filter: str) -> None:
    device = fleet.client(fleet.device("nosy-2"), "nosy-2")
    assert code(device.subscribe(topic_filter)[0]) == 1


@pytest.mark.parametrize(
    "topic_filter",
    [
        "$aws/things/any/shadow/get/accepted",
        "#",
        CSR_TOPIC,
        "$aws/certificates/#",
        wire.SERVICE_STATS_TOPIC,
    ],
)
def test_claim_subscribe_outside_its_policy_is_refused(fleet: Fleet, topic_filter: str) -> None:
    claim = fleet.client(fleet.claim, "claim-nosy")
    assert code(claim.subscribe(topic_filter)[0]) == NOT_AUTHORIZED_V5


def test_refusal_is_0x80_for_mqtt_311(fleet: Fleet) -> None:
    device = fleet.client(fleet.device("legacy-1"), "legacy-1", protocol=mqtt.MQTTv311)
    assert device.accepted
    assert code(device.subscribe("$aws/things/legacy-2/shadow/update/delta")[0]) == (
        NOT_AUTHORIZED_V311
    )
    assert code(device.subscribe(wire.shadow_delta("legacy-1"))[0]) == 1


# ---------------------------------------------------- 6. devices cannot publish replies


@pytest.mark.parametrize(
    "topic",
    [
        "$aws/things/honest-1/shadow/update/accepted",
        "$aws/things/honest-1/shadow/update/rejected",
        "$aws/things/honest-1/shadow/update/delta",
        "$aws/things/honest-1/shadow/update/documents",
        "$aws/things/honest-1/shadow/name/cfg/get/accepted",
        CSR_ACCEPTED,
    ],
)
def test_device_cannot_publish_a_reply(fleet: Fleet, topic: str) -> None:
    listener = fleet.client(fleet.device("honest-1"), "honest-1")
    listener.subscribe("$aws/things/honest-1/shadow/#")
    forger = fleet.client(fleet.device("forger-1"), "forger-1")
    # Even on its own thing's reply topics.
    own = topic.replace("honest-1", "forger-1")
    for target in {topic, own}:
        info = forger.publish(target, b'{"state": {"desired": {"unlock": true}}}')
        assert code(forger.puback(info)) == NOT_AUTHORIZED_V5
    time.sleep(0.3)
    assert listener.received.topics() == []


def test_device_cannot_publish_on_another_things_topics(fleet: Fleet) -> None:
    service = fleet.as_service()
    forger = fleet.client(fleet.device("forger-2"), "forger-2")
    info = forger.publish(wire.shadow_topic("victim-2", "update"), b'{"state": {}}')
    assert code(forger.puback(info)) == NOT_AUTHORIZED_V5
    time.sleep(0.3)
    assert not any("victim-2" in t for t in service.received.topics())


# ------------------------------------------------------------------- 7. revocation


def _kick(fleet: Fleet, certificate_id: str) -> None:
    operator = fleet.client(fleet.service, "operator-kick")
    operator.publish(wire.CONTROL_TOPIC, f"kick-certificate {certificate_id}")


def test_revoked_device_is_disconnected_and_refused(fleet: Fleet) -> None:
    creds = fleet.device("stolen-1")
    device = fleet.client(creds, "stolen-1")
    with fleet.registry() as registry:
        registry.set_certificate_status(creds.certificate_id, CertificateStatus.REVOKED)
    _kick(fleet, creds.certificate_id)
    assert device.disconnected.wait(1.0)
    assert code(fleet.client(creds, "stolen-1").connack) == NOT_AUTHORIZED_V5


def test_revoking_an_old_certificate_keeps_the_renewed_connection(fleet: Fleet) -> None:
    old = fleet.device("renewed-1")
    new = fleet.device("renewed-1")
    device = fleet.client(new, "renewed-1")
    _kick(fleet, old.certificate_id)
    assert stays_connected(device)


def test_only_the_service_identity_may_kick(fleet: Fleet) -> None:
    victim_creds = fleet.device("target-1")
    victim = fleet.client(victim_creds, "target-1")
    attacker = fleet.client(fleet.device("attacker-1"), "attacker-1")
    info = attacker.publish(wire.CONTROL_TOPIC, f"kick-certificate {victim_creds.certificate_id}")
    assert code(attacker.puback(info)) == NOT_AUTHORIZED_V5
    assert stays_connected(victim)


# ------------------------------------------------------------ 8. certificates we refuse


# An MQTT 3.1.1 CONNECT for client id "x": enough to see whether the broker answers.
RAW_CONNECT = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01x"


def connack_over_tls(fleet: Fleet, creds: Credentials | None) -> bool:
    """Handshake (with ``creds`` as client certificate, or none), send CONNECT: CONNACK back?"""
    context = ssl.create_default_context(cafile=str(fleet.pki.ca_cert))
    if creds is not None:
        context.load_cert_chain(str(creds.cert), str(creds.key))
    try:
        with (
            socket.create_connection(("127.0.0.1", fleet.config.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(RAW_CONNECT)
            return tls.recv(1) == b"\x20"
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return False


def test_tls_control_our_certificate_gets_a_connack(fleet: Fleet) -> None:
    assert connack_over_tls(fleet, fleet.device("tls-ok"))


def test_client_without_certificate_is_refused(fleet: Fleet) -> None:
    assert not connack_over_tls(fleet, None)


def test_certificate_from_another_ca_is_refused(fleet: Fleet) -> None:
    rogue_ca = CertificateAuthority.create(common_name="rogue CA")
    creds = fleet.identity(CertificateRole.DEVICE, thing="rogue-1", ca=rogue_ca, register=False)
    assert not connack_over_tls(fleet, creds)


def test_broker_certificate_is_verified_by_hostname(fleet: Fleet) -> None:
    context = ssl.create_default_context(cafile=str(fleet.pki.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", fleet.config.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="not-the-broker.example")


# ----------------------------------------------- 9. reload and Last Will safety


def test_sighup_keeps_offline_sessions_and_their_queued_messages(fleet: Fleet) -> None:
    creds = fleet.device("sleeper-9")
    delta = wire.shadow_delta("sleeper-9")
    device = fleet.client(creds, "sleeper-9", clean_start=False, session_expiry=3600)
    device.subscribe(delta)
    device.stop()
    service = fleet.as_service()
    service.publish(delta, b'{"state": {"led": "on"}}')
    broker_pid = fleet.stack.broker.pid
    for _ in range(2):
        fleet.stack.broker.reload()
        time.sleep(0.3)
    assert fleet.stack.broker.alive() and fleet.stack.broker.pid == broker_pid
    back = fleet.client(creds, "sleeper-9", clean_start=False, session_expiry=3600)
    assert back.accepted
    got = back.received.wait_for(lambda m: m.topic == delta)
    assert got is not None and got.payload == b'{"state": {"led": "on"}}'


def test_last_will_cannot_forge_a_request(fleet: Fleet) -> None:
    service = fleet.as_service()
    victim = fleet.client(fleet.claim, "claim-will-victim")
    victim.publish(CSR_TOPIC, b"{}")
    stamped = service.received.wait_for(lambda m: client_id_of(m) == "claim-will-victim")
    assert stamped is not None
    forged = [(k, v) for k, v in request_stamp(stamped).items()]
    attacker = fleet.client(
        fleet.claim, "claim-will-attacker", will=(CSR_TOPIC, b'{"forged": true}', forged)
    )
    assert attacker.accepted
    attacker.drop()  # ungraceful: the broker publishes the will
    time.sleep(1.0)
    assert not any(m.payload == b'{"forged": true}' for m in service.received.messages)
    # The service still hears real requests afterwards.
    victim.publish(CSR_TOPIC, b'{"after": true}')
    assert service.received.wait_for(lambda m: m.payload == b'{"after": true}') is not None


def request_stamp(message: mqtt.MQTTMessage) -> dict[str, str]:
    return {k: v for k, v in user_properties(message).items() if k.startswith("fleet-")}


def test_device_will_on_its_shadow_topic_is_not_forwarded(fleet: Fleet) -> None:
    service = fleet.as_service()
    topic = wire.shadow_topic("willful-1", "update")
    device = fleet.client(
        fleet.device("willful-1"), "willful-1", will=(topic, b'{"state": {"w": 1}}', [])
    )
    device.drop()
    time.sleep(1.0)
    assert topic not in service.received.topics()
