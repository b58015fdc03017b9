"""Fleet Provisioning by claim: the service half of agent/provisioning.py.

Answers CreateCertificateFromCsr, CreateKeysAndCertificate and RegisterThing exactly as AWS IoT
Core's MQTT API does (shared/reference/aws-iot-mqtt-api.md, section 1). Every failure is an
AWS-style rejection; nothing a device sends can crash or stall the service. Ownership tokens
and generated private keys exist only in the reply, never in a log line or on disk (the
registry keeps a token's hash).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from cryptography.hazmat.primitives import serialization

from agent import wire
from broker import registration
from broker.csr import validate_csr
from broker.hooks import Hook, HookInput
from broker.identity import Sender
from broker.pki import CertificateAuthority, certificate_pem, generate_private_key
from broker.registry import (
    CertificateRecord,
    CertificateStatus,
    InvalidOwnershipToken,
    Registration,
    Registry,
    ThingRevoked,
)
from broker.rejection import (
    Rejection,
    access_denied,
    internal,
    invalid_payload,
    invalid_token,
    not_found,
    too_large,
)
from broker.templates import ProvisioningPlan, Template, evaluate

log = logging.getLogger("fleet.provisioning")

MAX_PAYLOAD_BYTES = 65536
TOKEN_MESSAGES = {
    "unknown": "Certificate ownership token is invalid.",
    "used": "Certificate ownership token has already been used.",
    "expired": "Certificate ownership token has expired.",
}


class IssuedCertificate(TypedDict):
    """CreateCertificateFromCsr's accepted reply."""

    certificateId: str
    certificatePem: str
    certificateOwnershipToken: str


class IssuedKeysAndCertificate(IssuedCertificate):
    """CreateKeysAndCertificate's accepted reply: the same, with the key the service made."""

    privateKey: str


class RegisteredThing(TypedDict):
    """RegisterThing's accepted reply."""

    thingName: str
    deviceConfiguration: dict[str, str]


@dataclass(frozen=True)
class ProvisioningSettings:
    device_validity: dt.timedelta = dt.timedelta(days=365)
    token_lifetime: dt.timedelta = dt.timedelta(hours=1)
    allow_server_generated_keys: bool = False
    reserved_thing_names: frozenset[str] = frozenset()
    #: No thing name may start with these: the client-id spaces of claims and operators.
    reserved_thing_prefixes: tuple[str, ...] = (
        wire.CLAIM_CLIENT_ID_PREFIX,
        wire.OPERATOR_CLIENT_ID_PREFIX,
    )
    #: A device's renewal is refused (429) while its current certificate is younger than this,
    #: or than half its lifetime if that is shorter: a renewal loop costs one signature a
    #: minute, not dozens a second.
    min_renewal_interval: dt.timedelta = dt.timedelta(seconds=60)
    region: str = "local"
    account: str = "000000000000"


class ProvisioningService:
    def __init__(
        self,
        registry: Registry,
        ca: CertificateAuthority,
        templates: Mapping[str, Template],
        hooks: Mapping[str, Hook],
        settings: ProvisioningSettings,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    ) -> None:
        self.registry = registry
        self.ca = ca
        self.templates = dict(templates)
        self.hooks = dict(hooks)
        self.settings = settings
        self._rules = registration.RegistrationRules(
            settings.reserved_thing_names,
            settings.reserved_thing_prefixes,
            settings.min_renewal_interval,
        )
        self.clock = clock

    # ----------------------------------------------------------------- dispatch

    def handle(self, topic: str, payload: bytes, caller: Sender) -> tuple[str, bytes]:
        """One request in, one (reply topic, payload) out: accepted or rejected."""
        parsed = wire.parse_provisioning_request(topic)
        if parsed is None:
            raise ValueError(f"not a provisioning request topic: {topic}")
        operation, template_name, fmt = parsed
        try:
            if self.registry.not_active([caller.certificate_id]):
                # The broker disconnects a revoked certificate, but a request it forwarded
                # before that (or while its disconnect was lost) must not be acted on.
                raise access_denied("The certificate of this connection is not ACTIVE.")
            document = self._decode(payload, fmt)
            answer: IssuedCertificate | RegisteredThing
            if operation == "create-from-csr":
                answer = self.create_certificate_from_csr(document, caller)
            elif operation == "create":
                answer = self.create_keys_and_certificate(caller)
            else:
                assert template_name is not None
                answer = self.register_thing(template_name, document, caller)
            return wire.reply(topic, "accepted"), wire.encode(answer, fmt)
        except Rejection as rejection:
            log.info(
                "%s from %s rejected: %s %s",
                operation,
                caller.client_id,
                rejection.error_code,
                rejection.error_message,
            )
            return wire.reply(topic, "rejected"), wire.encode(rejection.document(), fmt)
        except Exception:  # a bug of ours must still get the device an answer
            log.exception("%s from %s failed", operation, caller.client_id)
            failure = internal("Internal service failure")
            return wire.reply(topic, "rejected"), wire.encode(failure.document(), fmt)

    @staticmethod
    def _decode(payload: bytes, fmt: wire.PayloadFormat) -> dict[str, Any]:
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise too_large(f"Payload exceeds the maximum of {MAX_PAYLOAD_BYTES} bytes.")
        if not payload.strip():
            return {}
        try:
            document = wire.decode(payload, fmt)
        except ValueError as exc:
            raise invalid_payload(f"Payload is {exc}") from None
        if not isinstance(document, dict):
            raise invalid_payload("Payload must be a JSON object.")
        return document

    # ------------------------------------------------------------ certificates

    def _issue(self, certificate: Any, caller: Sender) -> IssuedCertificate:
        token = secrets.token_urlsafe(32)  # 256 bits
        record = self.registry.issue_device_certificate(
            certificate,
            token,
            self.clock() + self.settings.token_lifetime,
            requested_by=caller.certificate_id,
        )
        return {
            "certificateId": record.id,
            "certificatePem": certificate_pem(certificate).decode(),
            "certificateOwnershipToken": token,
        }

    def _caller_certificate(self, caller: Sender) -> CertificateRecord | None:
        """A device's own certificate record (its renewal pace); None for other callers."""
        if caller.role != "device":
            return None
        return self.registry.get_certificate(caller.certificate_id)

    def _check_renewal_pace(self, caller: Sender) -> None:
        current = self._caller_certificate(caller)
        registration.check_renewal_pace(caller, current, self.clock(), self._rules)

    def create_certificate_from_csr(
        self, document: dict[str, Any], caller: Sender
    ) -> IssuedCertificate:
        self._check_renewal_pace(caller)
        csr_pem = document.get("certificateSigningRequest")
        if csr_pem is None:
            raise invalid_payload("Missing required field: certificateSigningRequest.")
        csr = validate_csr(csr_pem)
        certificate = self.ca.sign_csr(csr, validity=self.settings.device_validity)
        answer = self._issue(certificate, caller)
        log.info(
            "issued certificate %s… to %s (%s)",
            answer["certificateId"][:12],
            caller.client_id,
            caller.role,
        )
        return answer

    def create_keys_and_certificate(self, caller: Sender) -> IssuedKeysAndCertificate:
        if not self.settings.allow_server_generated_keys:
            raise access_denied(
                "CreateKeysAndCertificate is disabled on this broker: keys should be made on the "
                "device; use CreateCertificateFromCsr."
            )
        key = generate_private_key()
        certificate = self.ca.issue(
            key.public_key(),
            common_name=f"device of {caller.client_id}"[:64],
            validity=self.settings.device_validity,
            purpose="client",
        )
        issued = self._issue(certificate, caller)
        answer: IssuedKeysAndCertificate = {
            **issued,
            "privateKey": key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
        }
        log.info(
            "issued keys and certificate %s… to %s", answer["certificateId"][:12], caller.client_id
        )
        return answer

    # ------------------------------------------------------------- registration

    def register_thing(
        self, template_name: str, document: dict[str, Any], caller: Sender
    ) -> RegisteredThing:
        template = self.templates.get(template_name)
        if template is None:
            raise not_found(f"Provisioning template {template_name} does not exist.")
        token = document.get("certificateOwnershipToken")
        if not isinstance(token, str) or not token:
            raise invalid_token("Certificate ownership token cannot be empty.")
        parameters = document.get("parameters", {})
        if not isinstance(parameters, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parameters.items()
        ):
            raise invalid_payload("parameters must be an object of string values.")
        try:
            grant = self.registry.peek_ownership_token(token, now=self.clock())
        except InvalidOwnershipToken as exc:
            raise invalid_token(TOKEN_MESSAGES[exc.reason]) from None
        # A token is not a bearer token: only the certificate that asked for it may use it
        # (AWS's wording for any token it will not take, so nothing is learnt from it).
        if grant.requested_by is not None and grant.requested_by != caller.certificate_id:
            raise invalid_token(TOKEN_MESSAGES["unknown"])
        certificate_id = grant.certificate_id
        record = self.registry.get_certificate(certificate_id)
        if record is None:
            raise invalid_token(TOKEN_MESSAGES["unknown"])

        hook = self.hooks.get(template_name)
        if hook is not None:
            overrides = hook.decide(
                HookInput(
                    claim_certificate_id=caller.certificate_id if caller.role == "claim" else None,
                    certificate_id=certificate_id,
                    certificate_pem=record.pem,
                    template_arn=self._template_arn(template_name),
                    client_id=caller.client_id,
                    parameters=parameters,
                )
            )
            parameters = {**parameters, **overrides}

        plan = evaluate(template, parameters, certificate_id=certificate_id)
        registration = self._registration(plan, token, certificate_id, caller)
        try:
            thing = self.registry.complete_registration(registration)
        except InvalidOwnershipToken as exc:  # used up concurrently
            raise invalid_token(TOKEN_MESSAGES[exc.reason]) from None
        except ThingRevoked as exc:  # revoked concurrently
            raise access_denied(str(exc)) from None
        log.info(
            "registered thing %s with certificate %s… (%s)",
            thing.name,
            certificate_id[:12],
            registration.certificate_status.value,
        )
        return {"thingName": thing.name, "deviceConfiguration": dict(plan.device_configuration)}

    def _template_arn(self, name: str) -> str:
        s = self.settings
        return f"arn:aws:iot:{s.region}:{s.account}:provisioningtemplate/{name}"

    def _registration(
        self, plan: ProvisioningPlan, token: str, certificate_id: str, caller: Sender
    ) -> Registration:
        """The registry's facts about the thing ``plan`` names, then the pure decision."""
        name = plan.thing.name if plan.thing is not None else None
        existing = self.registry.get_thing(name) if name is not None else None
        other_active = (
            [
                c
                for c in self.registry.list_certificates(thing_name=existing.name)
                if c.status is CertificateStatus.ACTIVE and c.id != certificate_id
            ]
            if existing is not None
            else []
        )
        current = self._caller_certificate(caller)
        facts = registration.RegistrationFacts(self.clock(), existing, other_active, current)
        return registration.decide(plan, token, certificate_id, caller, facts, self._rules)
