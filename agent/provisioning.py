"""Fleet Provisioning by claim, device side, as pure logic (no sockets, no asyncio).

A transport drives `ClaimFlow`: subscribe to `ClaimFlow.reply_topics()` before the first
publish, publish `flow.start()`, then hand every reply to `flow.receive()`, which returns the
next request to publish or the final `ProvisioningResult`, or raises `ProvisioningRejected`.
`RetryPolicy` says, as pure data, which failures are worth another attempt and how long to wait.

Wire facts (topics, payloads) come from `agent.wire` and shared/reference/aws-iot-mqtt-api.md
section 1. The certificate ownership token stays inside the flow object: it is never part of a
repr, an exception or a log line.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent import wire

DEFAULT_TEMPLATE: Final = "fleet-default"
DEFAULT_COMMON_NAME: Final = "fleet-agent"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class Step(enum.Enum):
    CREATE_CERTIFICATE = "CreateCertificateFromCsr"
    REGISTER_THING = "RegisterThing"
    DONE = "done"


class ProvisioningError(Exception):
    """The claim flow could not complete."""


class ProvisioningRejected(ProvisioningError):
    """The service answered on a ``.../rejected`` topic."""

    def __init__(self, status_code: int, error_code: str, error_message: str, step: Step) -> None:
        super().__init__(status_code, error_code, error_message, step)
        self.status_code = status_code
        self.error_code = error_code
        self.error_message = error_message
        self.step = step

    def __str__(self) -> str:
        return (
            f"{self.step.value} rejected: {self.error_code} ({self.status_code}): "
            f"{self.error_message}"
        )


class ProtocolViolation(ProvisioningError):
    """A reply that does not follow the Fleet Provisioning API (bad JSON, missing field)."""


@dataclass(frozen=True)
class Request:
    """One message to publish, and the topics on which its answer arrives."""

    topic: str
    payload: bytes = field(repr=False)  # a RegisterThing payload carries the token
    reply_topics: tuple[str, str]  # (accepted, rejected)


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_id: str
    certificate_pem: str = field(repr=False)
    ownership_token: str = field(repr=False)


@dataclass(frozen=True)
class ProvisioningResult:
    thing_name: str
    certificate_id: str
    certificate_pem: str = field(repr=False)
    device_configuration: Mapping[str, str]


# ------------------------------------------------------------------- messages


def build_csr(key: PrivateKey, common_name: str = DEFAULT_COMMON_NAME) -> str:
    """A PEM CSR for ``key``. AWS ignores the subject; the thing is named by the template."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _request(topic: str, document: Mapping[str, Any]) -> Request:
    return Request(
        topic=topic,
        payload=wire.encode(dict(document)),
        reply_topics=(wire.reply(topic, wire.ACCEPTED), wire.reply(topic, wire.REJECTED)),
    )


def create_certificate_request(csr_pem: str) -> Request:
    return _request(wire.create_certificate_from_csr(), {"certificateSigningRequest": csr_pem})


def register_thing_request(
    template: str, ownership_token: str, parameters: Mapping[str, str] | None = None
) -> Request:
    if not wire.TEMPLATE_NAME_PATTERN.fullmatch(template):
        raise ValueError(
            f"template name {template!r} is invalid: 1-36 characters from A-Z a-z 0-9 _ -"
        )
    document: dict[str, Any] = {"certificateOwnershipToken": ownership_token}
    if parameters:
        document["parameters"] = dict(parameters)
    return _request(wire.register_thing(template), document)


def _decode(payload: bytes, step: Step) -> dict[str, Any]:
    try:
        document = wire.decode(payload)
    except ValueError as exc:
        raise ProtocolViolation(f"{step.value} reply is {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolViolation(f"{step.value} reply is not a JSON object")
    return document


def _strings(document: dict[str, Any], step: Step, *names: str) -> list[str]:
    values = []
    for name in names:
        value = document.get(name)
        if not isinstance(value, str) or not value:
            raise ProtocolViolation(f"{step.value} reply lacks the string field {name}")
        values.append(value)
    return values


def _outcome(request: Request, topic: str, payload: bytes, step: Step) -> dict[str, Any]:
    """The accepted document, or raise the rejection; a foreign topic is a ValueError."""
    accepted, rejected = request.reply_topics
    if topic not in (accepted, rejected):
        raise ValueError(f"{topic} is not a reply to {request.topic}")
    document = _decode(payload, step)
    if topic == rejected:
        status = document.get("statusCode")
        raise ProvisioningRejected(
            status if isinstance(status, int) and not isinstance(status, bool) else 0,
            str(document.get("errorCode", "Unknown")),
            str(document.get("errorMessage", "")),
            step,
        )
    return document


def parse_create_certificate_reply(
    request: Request, topic: str, payload: bytes
) -> IssuedCertificate:
    document = _outcome(request, topic, payload, Step.CREATE_CERTIFICATE)
    cert_id, pem, token = _strings(
        document,
        Step.CREATE_CERTIFICATE,
        "certificateId",
        "certificatePem",
        "certificateOwnershipToken",
    )
    return IssuedCertificate(cert_id, pem, token)


def parse_register_thing_reply(
    request: Request, topic: str, payload: bytes, issued: IssuedCertificate
) -> ProvisioningResult:
    document = _outcome(request, topic, payload, Step.REGISTER_THING)
    (thing_name,) = _strings(document, Step.REGISTER_THING, "thingName")
    if not wire.THING_NAME_PATTERN.fullmatch(thing_name):
        raise ProtocolViolation(f"RegisterThing returned an invalid thing name {thing_name!r}")
    configuration = document.get("deviceConfiguration", {})
    if not isinstance(configuration, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in configuration.items()
    ):
        raise ProtocolViolation("RegisterThing reply has a deviceConfiguration of non-strings")
    return ProvisioningResult(
        thing_name, issued.certificate_id, issued.certificate_pem, dict(configuration)
    )


# ------------------------------------------------------------------- the flow


class ClaimFlow:
    """CreateCertificateFromCsr, then RegisterThing with the ownership token.

    Holds the token in memory only; `pending` is the request awaiting its reply (publish it
    again to retry that step).
    """

    def __init__(
        self,
        key: PrivateKey,
        *,
        template: str = DEFAULT_TEMPLATE,
        parameters: Mapping[str, str] | None = None,
        common_name: str = DEFAULT_COMMON_NAME,
    ) -> None:
        self.template = template
        self.parameters = dict(parameters or {})
        for name, value in self.parameters.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise ValueError("provisioning parameters must map strings to strings")
        self._csr = build_csr(key, common_name)
        register_thing_request(template, "-")  # validate the template name up front
        self.step = Step.CREATE_CERTIFICATE
        self._issued: IssuedCertificate | None = None
        self.pending: Request | None = None
        self.result: ProvisioningResult | None = None

    def __repr__(self) -> str:
        return f"ClaimFlow(template={self.template!r}, step={self.step.name})"

    def reply_topics(self) -> tuple[str, ...]:
        """Every reply topic of the flow: subscribe to all of them before the first publish."""
        return (
            *self._request_for(Step.CREATE_CERTIFICATE).reply_topics,
            *register_thing_request(self.template, "-").reply_topics,
        )

    @property
    def certificate_id(self) -> str | None:
        return self._issued.certificate_id if self._issued else None

    def _request_for(self, step: Step) -> Request:
        if step is Step.CREATE_CERTIFICATE:
            return create_certificate_request(self._csr)
        assert self._issued is not None
        return register_thing_request(self.template, self._issued.ownership_token, self.parameters)

    def start(self) -> Request:
        """The first request (CreateCertificateFromCsr)."""
        self.step = Step.CREATE_CERTIFICATE
        self._issued = None
        self.pending = self._request_for(self.step)
        return self.pending

    def receive(self, topic: str, payload: bytes) -> Request | ProvisioningResult:
        """A reply in; the next request or the result out. Rejections raise."""
        if self.pending is None:
            raise RuntimeError(f"no request in flight (step {self.step.name})")
        if self.step is Step.CREATE_CERTIFICATE:
            self._issued = parse_create_certificate_reply(self.pending, topic, payload)
            self.step = Step.REGISTER_THING
            self.pending = self._request_for(self.step)
            return self.pending
        assert self._issued is not None
        result = parse_register_thing_reply(self.pending, topic, payload, self._issued)
        self._issued = None  # the token is spent: forget it
        self.pending = None
        self.step = Step.DONE
        self.result = result
        return result


# ------------------------------------------------------------------ retries


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures to retry and how long to wait: exponential backoff with full jitter.

    5xx and 429 rejections and request timeouts are transient; any other 4xx fails at once.
    ``attempt`` counts the failures so far (1 after the first).
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    retry_timeouts: bool = True

    @staticmethod
    def is_transient(rejection: ProvisioningRejected) -> bool:
        return rejection.status_code == 429 or 500 <= rejection.status_code <= 599

    def backoff(
        self, attempt: int, uniform: Callable[[float, float], float] = random.uniform
    ) -> float:
        """Full jitter: uniform in [0, min(max_delay, base_delay * 2**(attempt-1))]."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, attempt - 1))
        return uniform(0.0, ceiling)

    def delay(
        self,
        attempt: int,
        error: ProvisioningRejected | TimeoutError,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> float | None:
        """Seconds to wait before retrying after failure number ``attempt``; None: give up."""
        if attempt >= self.max_attempts:
            return None
        if isinstance(error, ProvisioningRejected):
            if not self.is_transient(error):
                return None
        elif not self.retry_timeouts:
            return None
        return self.backoff(attempt, uniform)
