"""Fleet Provisioning by claim against the real stack: the services process answers, devices
are paho clients holding the shared claim certificate. Every rejection is followed by a good
request that must still succeed."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent import wire
from broker.pki import write_private_key, write_public_file
from broker.registry import CertificateStatus
from tests.fleet import Client, Credentials, Fleet, running_fleet

pytestmark = pytest.mark.stack

CSR_TOPIC = wire.create_certificate_from_csr()
TEMPLATE = "fleet-default"

HOOKED_TEMPLATE = {
    "Parameters": {"SerialNumber": {"Type": "String"}},
    "Resources": {
        "thing": {
            "Type": "AWS::IoT::Thing",
            "Properties": {"ThingName": {"Fn::Join": ["", ["hooked-", {"Ref": "SerialNumber"}]]}},
        },
        "certificate": {
            "Type": "AWS::IoT::Certificate",
            "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                "Status": "ACTIVE",
            },
        },
    },
}
BROKEN_TEMPLATE = {
    "Resources": {
        "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "AWS::Region"}}}
    }
}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """The whole stack, services included, with two extra templates."""
    templates = {
        "hooked.json": HOOKED_TEMPLATE,
        "hooked.hook.json": {"allowSerials": ["ALLOWED-1"]},
        "broken.json": BROKEN_TEMPLATE,
    }
    with running_fleet(services=True, templates=templates) as running:
        yield running


@dataclass
class Device:
    """A device onboarding by claim: its own key, the shared claim certificate."""

    fleet: Fleet
    client: Client
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def connect(cls, fleet: Fleet, client_id: str, claim: Credentials | None = None) -> Device:
        client = fleet.client(claim or fleet.claim, client_id)
        assert client.accepted, client.connack
        for topic in wire.PROVISIONING_REPLY_FILTERS:
            client.subscribe(topic)
        return cls(fleet, client, ec.generate_private_key(ec.SECP256R1()))

    def csr_pem(self, key: object | None = None) -> str:
        signer = key or self.key
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")]))
            .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
        )
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    def request(self, topic: str, payload: bytes | str) -> tuple[str, dict]:
        """Publish a request; wait for its accepted or rejected reply."""
        self.client.received.messages.clear()
        self.client.publish(topic, payload)
        reply = self.client.received.wait_for(
            lambda m: m.topic in (wire.reply(topic, "accepted"), wire.reply(topic, "rejected")),
            timeout=10,
        )
        assert reply is not None, f"no reply to {topic}"
        return reply.topic.rsplit("/", 1)[1], json.loads(reply.payload)

    def create_certificate(self) -> dict:
        outcome, answer = self.request(
            CSR_TOPIC, json.dumps({"certificateSigningRequest": self.csr_pem()})
        )
        assert outcome == "accepted", answer
        return answer

    def register(self, token: str, template: str = TEMPLATE, **parameters: str) -> tuple[str, dict]:
        return self.request(
            wire.register_thing(template),
            json.dumps({"certificateOwnershipToken": token, "parameters": parameters}),
        )

    def save_credentials(self, certificate_pem: str, name: str) -> Credentials:
        folder = self.fleet.workdir / "provisioned"
        folder.mkdir(exist_ok=True)
        write_private_key(folder / f"{name}.key", self.key)
        write_public_file(folder / f"{name}.pem", certificate_pem.encode())
        return Credentials(folder / f"{name}.pem", folder / f"{name}.key")


def onboard(fleet: Fleet, serial: str) -> tuple[Device, dict, dict]:
    device = Device.connect(fleet, f"claim-{serial}")
    certificate = device.create_certificate()
    outcome, registered = device.register(
        certificate["certificateOwnershipToken"], SerialNumber=serial
    )
    assert outcome == "accepted", registered
    return device, certificate, registered


# ---------------------------------------------------------------------- the whole flow


def test_device_onboards_by_claim_and_connects_as_its_thing(fleet: Fleet) -> None:
    device, certificate, registered = onboard(fleet, "SN-0001")
    assert len(certificate["certificateId"]) == 64
    issued = x509.load_pem_x509_certificate(certificate["certificatePem"].encode())
    # The certificate is for the key the device made: the private key never left it.
    assert issued.public_key().public_numbers() == device.key.public_key().public_numbers()
    thing = registered["thingName"]
    assert thing == "generic-SN-0001"
    assert registered["deviceConfiguration"] == {"shadowSyncSeconds": "30"}
    with fleet.registry() as registry:
        record = registry.get_certificate(certificate["certificateId"])
        assert record is not None
        assert record.status is CertificateStatus.ACTIVE and record.thing_name == thing
        assert registry.get_thing(thing).attributes["serial"] == "SN-0001"  # type: ignore[union-attr]
    own = device.save_credentials(certificate["certificatePem"], thing)
    connected = fleet.client(own, thing)
    assert connected.accepted
    assert connected.subscribe(wire.shadow_delta(thing))[0].value == 1


def test_certificate_is_pending_until_registered(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-pending")
    certificate = device.create_certificate()
    own = device.save_credentials(certificate["certificatePem"], "pending")
    with fleet.registry() as registry:
        record = registry.get_certificate(certificate["certificateId"])
        assert record is not None and record.status is CertificateStatus.PENDING_ACTIVATION
    assert fleet.client(own, "pending").connack.value == 0x87  # type: ignore[union-attr]


def test_ownership_token_never_reaches_the_logs(fleet: Fleet) -> None:
    _, certificate, _ = onboard(fleet, "SN-LOG")
    token = certificate["certificateOwnershipToken"]
    for log in (fleet.stack.files.services_log, fleet.stack.files.log):
        assert token not in log.read_text()


# ------------------------------------------------------------------------ rejections


def expect_rejection(device: Device, topic: str, payload: bytes | str, code: str) -> dict:
    outcome, answer = device.request(topic, payload)
    assert outcome == "rejected", answer
    assert set(answer) == {"statusCode", "errorCode", "errorMessage"}
    assert answer["errorCode"] == code, answer
    return answer


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "InvalidPayload"),
        (b"[1, 2]", "InvalidPayload"),
        (b"{}", "InvalidPayload"),
        (json.dumps({"certificateSigningRequest": "-----BEGIN NONSENSE-----"}), "InvalidCSR"),
        (json.dumps({"certificateSigningRequest": 42}), "InvalidCSR"),
        (b"{" + b" " * 70000 + b"}", "PayloadTooLarge"),
    ],
)
def test_bad_csr_request_is_rejected_then_service_still_works(
    fleet: Fleet, payload: bytes | str, code: str
) -> None:
    device = Device.connect(fleet, f"claim-bad-{code}-{len(payload)}")
    expect_rejection(device, CSR_TOPIC, payload, code)
    device.create_certificate()


def test_weak_key_csr_is_rejected(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-weak")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    body = json.dumps({"certificateSigningRequest": device.csr_pem(weak)})
    answer = expect_rejection(device, CSR_TOPIC, body, "InvalidCSR")
    assert "2048" in answer["errorMessage"]


def test_register_rejections_then_success(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-register")
    token = device.create_certificate()["certificateOwnershipToken"]
    register = wire.register_thing(TEMPLATE)
    expect_rejection(device, register, b"{oops", "InvalidPayload")
    expect_rejection(
        device, register, json.dumps({"parameters": {}}), "InvalidCertificateOwnershipToken"
    )
    expect_rejection(
        device,
        register,
        json.dumps({"certificateOwnershipToken": "forged"}),
        "InvalidCertificateOwnershipToken",
    )
    expect_rejection(
        device,
        register,
        json.dumps({"certificateOwnershipToken": token, "parameters": {"SerialNumber": 7}}),
        "InvalidPayload",
    )
    # A required template parameter missing: the token must survive for a corrected retry.
    expect_rejection(
        device, register, json.dumps({"certificateOwnershipToken": token}), "InvalidParameters"
    )
    expect_rejection(
        device,
        wire.register_thing("no-such-template"),
        json.dumps({"certificateOwnershipToken": token}),
        "ResourceNotFound",
    )
    outcome, answer = device.register(token, SerialNumber="SN-RETRY")
    assert outcome == "accepted", answer
    # Single use.
    outcome, answer = device.register(token, SerialNumber="SN-RETRY-2")
    assert outcome == "rejected" and answer["errorCode"] == "InvalidCertificateOwnershipToken"


def test_expired_token_is_rejected(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-expired")
    certificate = device.create_certificate()
    stale = "expired-token-for-test"
    with fleet.registry() as registry:
        registry.add_ownership_token(
            certificate["certificateId"],
            stale,
            dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1),
        )
    outcome, answer = device.register(stale, SerialNumber="SN-EXP")
    assert outcome == "rejected" and "expired" in answer["errorMessage"]
    outcome, _ = device.register(certificate["certificateOwnershipToken"], SerialNumber="SN-EXP")
    assert outcome == "accepted"


def test_unresolvable_template_reference_is_rejected(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-broken")
    token = device.create_certificate()["certificateOwnershipToken"]
    outcome, answer = device.register(token, template="broken")
    assert outcome == "rejected" and answer["errorCode"] == "InvalidParameters"
    assert "AWS::Region" in answer["errorMessage"]


def test_pre_provisioning_hook_allows_and_denies(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-hook")
    token = device.create_certificate()["certificateOwnershipToken"]
    outcome, answer = device.register(token, template="hooked", SerialNumber="NOT-LISTED")
    assert outcome == "rejected" and answer["statusCode"] == 403
    outcome, answer = device.register(token, template="hooked", SerialNumber="ALLOWED-1")
    assert outcome == "accepted" and answer["thingName"] == "hooked-ALLOWED-1"


def test_claim_cannot_take_over_an_existing_thing(fleet: Fleet) -> None:
    owner, certificate, registered = onboard(fleet, "SN-OWNED")
    creds = owner.save_credentials(certificate["certificatePem"], "owned")
    thing = registered["thingName"]
    assert fleet.client(creds, thing).accepted  # the device has its certificate in use
    wait_for_status(fleet, certificate["certificateId"], awaiting_first_connect=False)
    attacker = Device.connect(fleet, "claim-attacker")
    token = attacker.create_certificate()["certificateOwnershipToken"]
    outcome, answer = attacker.register(token, SerialNumber="SN-OWNED")
    assert outcome == "rejected" and answer["errorCode"] == "ResourceConflictsException"


def test_an_onboarding_that_died_before_connecting_can_be_redone(fleet: Fleet) -> None:
    """The device got RegisterThing accepted, then lost power before storing its key: the
    certificate never connected, so the same serial may register again (with a shared claim
    that is the only way back), and the orphan is retired."""
    _, lost, registered = onboard(fleet, "SN-REBORN")
    again = Device.connect(fleet, "claim-SN-REBORN-after-reboot")
    certificate = again.create_certificate()
    outcome, second = again.register(
        certificate["certificateOwnershipToken"], SerialNumber="SN-REBORN"
    )
    assert outcome == "accepted", second
    assert second["thingName"] == registered["thingName"]
    with fleet.registry() as registry:
        orphan = registry.get_certificate(lost["certificateId"])
        assert orphan is not None and orphan.status is CertificateStatus.INACTIVE
    creds = again.save_credentials(certificate["certificatePem"], "reborn")
    assert fleet.client(creds, second["thingName"]).accepted


def wait_for_status(fleet: Fleet, certificate_id: str, *, awaiting_first_connect: bool) -> None:
    deadline = time.monotonic() + 10
    while True:
        with fleet.registry() as registry:
            record = registry.get_certificate(certificate_id)
        assert record is not None
        if record.awaiting_first_connect is awaiting_first_connect:
            return
        assert time.monotonic() < deadline, "the first connect was not recorded"
        time.sleep(0.05)


def test_create_keys_and_certificate_is_disabled_by_default(fleet: Fleet) -> None:
    device = Device.connect(fleet, "claim-keys")
    answer = expect_rejection(device, wire.create_keys_and_certificate(), b"{}", "AccessDenied")
    assert "CreateCertificateFromCsr" in answer["errorMessage"]


# ----------------------------------------------------------------------------- at scale


def test_200_devices_provision_at_once_with_one_claim_certificate(fleet: Fleet) -> None:
    devices = [Device.connect(fleet, f"claim-crowd-{i:03d}") for i in range(200)]
    results: dict[int, tuple[dict, str, dict]] = {}
    errors: list[str] = []

    def run(i: int, device: Device) -> None:
        try:
            certificate = device.create_certificate()
            outcome, registered = device.register(
                certificate["certificateOwnershipToken"], SerialNumber=f"CROWD-{i:03d}"
            )
            results[i] = (certificate, outcome, registered)
        except AssertionError as exc:
            errors.append(f"{i}: {exc}")

    threads = [threading.Thread(target=run, args=(i, d)) for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert len(results) == 200
    things = set()
    for i, (certificate, outcome, registered) in results.items():
        assert outcome == "accepted", registered
        # Each device got the certificate for its own key: no reply went to the wrong connection.
        issued = x509.load_pem_x509_certificate(certificate["certificatePem"].encode())
        assert issued.public_key().public_numbers() == (
            devices[i].key.public_key().public_numbers()
        )
        assert registered["thingName"] == f"generic-CROWD-{i:03d}"
        things.add(registered["thingName"])
    assert len(things) == 200
    with fleet.registry() as registry:
        for certificate, _, registered in results.values():
            record = registry.get_certificate(certificate["certificateId"])
            assert record is not None and record.status is CertificateStatus.ACTIVE
            assert record.thing_name == registered["thingName"]
