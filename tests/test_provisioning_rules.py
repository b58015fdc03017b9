"""broker/provisioning.py's registration rules on a real registry, no broker: who may register
which thing with which token (the fast path of tests/test_attacks.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import wire
from broker.hooks import Hook
from broker.identity import Sender
from broker.pki import CertificateAuthority, generate_private_key
from broker.provisioning import ProvisioningService, ProvisioningSettings
from broker.registry import CertificateRole, CertificateStatus, SQLiteRegistry
from broker.templates import DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_NAME, Template

pytestmark = pytest.mark.unit

CSR = wire.create_certificate_from_csr()
REGISTER = wire.register_thing(DEFAULT_TEMPLATE_NAME)


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SQLiteRegistry]:
    with SQLiteRegistry.open(tmp_path / "registry.db") as opened:
        yield opened


@pytest.fixture
def service(registry: SQLiteRegistry, ca: CertificateAuthority) -> ProvisioningService:
    templates = {DEFAULT_TEMPLATE_NAME: Template(DEFAULT_TEMPLATE_NAME, DEFAULT_TEMPLATE)}
    hooks: dict[str, Hook] = {}
    return ProvisioningService(registry, ca, templates, hooks, ProvisioningSettings())


def claim(registry: SQLiteRegistry, ca: CertificateAuthority, client_id: str) -> Sender:
    cert = ca.issue(
        generate_private_key().public_key(), common_name="claim", days=1, purpose="client"
    )
    record = registry.add_certificate(
        cert, role=CertificateRole.CLAIM, status=CertificateStatus.ACTIVE
    )
    return Sender(client_id, "1", "claim", record.id, None)


def csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def ask(service: ProvisioningService, topic: str, body: dict, caller: Sender) -> tuple[str, dict]:
    reply_topic, payload = service.handle(topic, json.dumps(body).encode(), caller)
    return reply_topic.rsplit("/", 1)[1], json.loads(payload)


def token_for(service: ProvisioningService, caller: Sender) -> str:
    outcome, answer = ask(service, CSR, {"certificateSigningRequest": csr()}, caller)
    assert outcome == "accepted", answer
    return answer["certificateOwnershipToken"]


def register(service: ProvisioningService, caller: Sender, token: str, **parameters: str):
    return ask(
        service, REGISTER, {"certificateOwnershipToken": token, "parameters": parameters}, caller
    )


def test_a_revoked_thing_is_refused_until_enabled(service, registry, ca) -> None:
    shared = claim(registry, ca, "claim-1")
    assert register(service, shared, token_for(service, shared), SerialNumber="S1")[0] == "accepted"
    registry.revoke("generic-S1", actor="ops")
    outcome, answer = register(service, shared, token_for(service, shared), SerialNumber="S1")
    assert (outcome, answer["statusCode"], answer["errorCode"]) == ("rejected", 403, "AccessDenied")
    assert "generic-S1" in answer["errorMessage"]
    registry.enable_thing("generic-S1", actor="ops")
    assert register(service, shared, token_for(service, shared), SerialNumber="S1")[0] == "accepted"
    assert [e.action for e in registry.audit_log()] == ["enable-thing", "revoke-thing"]


def test_a_token_is_bound_to_the_certificate_that_asked(service, registry, ca) -> None:
    first, second = claim(registry, ca, "claim-a"), claim(registry, ca, "claim-b")
    token = token_for(service, first)
    outcome, answer = register(service, second, token, SerialNumber="T1")
    assert (outcome, answer["errorCode"]) == ("rejected", "InvalidCertificateOwnershipToken")
    assert register(service, first, token, SerialNumber="T1")[0] == "accepted"


def test_only_the_registering_claim_may_redo_a_pending_registration(service, registry, ca) -> None:
    first, second = claim(registry, ca, "claim-a"), claim(registry, ca, "claim-b")
    assert register(service, first, token_for(service, first), SerialNumber="P1")[0] == "accepted"
    outcome, answer = register(service, second, token_for(service, second), SerialNumber="P1")
    assert (outcome, answer["statusCode"]) == ("rejected", 409)
    assert register(service, first, token_for(service, first), SerialNumber="P1")[0] == "accepted"


@pytest.mark.parametrize(
    ("parameters", "status"),
    [
        ({"SerialNumber": "", "DeviceModel": ""}, 400),  # "-": no device could be told apart
        ({"SerialNumber": "x", "DeviceModel": "claim"}, 409),  # claim-x: a claim's client id
    ],
)
def test_names_no_device_could_use_are_refused(service, registry, ca, parameters, status) -> None:
    caller = claim(registry, ca, "claim-n")
    outcome, answer = register(service, caller, token_for(service, caller), **parameters)
    assert (outcome, answer["statusCode"]) == ("rejected", status), answer


def test_a_caller_whose_certificate_is_no_longer_active_is_refused(service, registry, ca) -> None:
    caller = claim(registry, ca, "claim-r")
    registry.set_certificate_status(caller.certificate_id, CertificateStatus.REVOKED)
    outcome, answer = ask(service, CSR, {"certificateSigningRequest": csr()}, caller)
    assert (outcome, answer["statusCode"]) == ("rejected", 403)


def test_a_deeply_nested_payload_is_a_400(service, registry, ca) -> None:
    caller = claim(registry, ca, "claim-deep")
    reply_topic, payload = service.handle(CSR, b"[" * 30000 + b"]" * 30000, caller)
    assert reply_topic.endswith("/rejected") and json.loads(payload)["statusCode"] == 400


def test_a_device_renewing_too_soon_is_throttled_before_anything_is_signed(
    service, registry, ca
) -> None:
    shared = claim(registry, ca, "claim-pace")
    outcome, answer = ask(service, CSR, {"certificateSigningRequest": csr()}, shared)
    certificate_id = answer["certificateId"]
    register(service, shared, answer["certificateOwnershipToken"], SerialNumber="PACE-1")
    device = Sender("generic-PACE-1", "2", "device", certificate_id, "generic-PACE-1")
    before = len(registry.list_certificates())
    outcome, answer = ask(service, CSR, {"certificateSigningRequest": csr()}, device)
    assert (outcome, answer["statusCode"], answer["errorCode"]) == ("rejected", 429, "Throttling")
    assert "too soon" in answer["errorMessage"]
    assert len(registry.list_certificates()) == before  # nothing signed
