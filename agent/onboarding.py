"""Onboarding by claim, end to end: the pure claim flow driven over real sessions.

claim connect -> subscribe -> CreateCertificateFromCsr -> RegisterThing -> persist key,
certificate and record -> disconnect -> connect with the NEW certificate as the thing and prove
it works (CONNACK success and a SUBACK on its own shadow delta topic).

Used by ``fleet-agent provision`` and, many at a time in one event loop, by the simulator:
nothing here blocks the loop (file writes with fsync run in the default executor, RSA key
generation too) and nothing is per-device except the key, one session at a time and the flow.
Every failure is an `OnboardingFailed` whose message is one line naming the cause; the
ownership token and the private key never appear in one.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent import wire
from agent.keystore import Keystore, KeystoreError, KeyType, ProvisioningRecord, generate_key
from agent.provisioning import (
    DEFAULT_COMMON_NAME,
    DEFAULT_TEMPLATE,
    ClaimFlow,
    ProvisioningError,
    ProvisioningRejected,
    ProvisioningResult,
    RetryPolicy,
)
from agent.session import (
    BrokerUnreachable,
    ConnectRefused,
    Session,
    SessionError,
    SessionTimeout,
    TlsFailure,
    connect,
    tls_context,
)


class Stage(enum.Enum):
    CLAIM_CONNECT = "claim connect"
    PROVISION = "provision"
    PERSIST = "persist"
    VERIFY = "verify"


class Cause(enum.Enum):
    CLAIM_REFUSED = "claim certificate refused"
    CERTIFICATE_REFUSED = "certificate refused"
    REJECTED = "rejected"
    UNREACHABLE = "broker unreachable"
    TLS = "TLS failure"
    TIMEOUT = "timeout"
    CONNECTION_LOST = "connection lost"
    PROTOCOL = "protocol error"
    STORAGE = "storage error"


class OnboardingFailed(Exception):
    """One line for the operator; ``transient`` if trying again later may succeed."""

    def __init__(
        self,
        stage: Stage,
        cause: Cause,
        message: str,
        *,
        transient: bool,
        error_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.cause = cause
        self.transient = transient
        self.error_code = error_code  # the AWS errorCode of a rejection


@dataclass(frozen=True)
class ClaimSettings:
    """Where and how to onboard. ``claim_context`` may be shared by many devices."""

    endpoint: str
    port: int
    ca_file: Path
    claim_context: ssl.SSLContext
    template: str = DEFAULT_TEMPLATE
    parameters: Mapping[str, str] = field(default_factory=dict)
    key_type: KeyType = "ec-p256"
    common_name: str = DEFAULT_COMMON_NAME
    timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    claim_client_id: str | None = None


@dataclass(frozen=True)
class Onboarded:
    result: ProvisioningResult
    record: ProvisioningRecord
    seconds: float


Sleep = Callable[[float], Awaitable[None]]


def _session_failure(stage: Stage, exc: SessionError, *, claim: bool) -> OnboardingFailed:
    if (isinstance(exc, ConnectRefused) and exc.identity_refused) or (
        isinstance(exc, TlsFailure) and exc.peer_refused
    ):
        cause = Cause.CLAIM_REFUSED if claim else Cause.CERTIFICATE_REFUSED
        return OnboardingFailed(stage, cause, f"{cause.value}: {exc}", transient=False)
    if isinstance(exc, BrokerUnreachable):
        return OnboardingFailed(
            stage, Cause.UNREACHABLE, f"broker unreachable: {exc}", transient=True
        )
    if isinstance(exc, TlsFailure):
        return OnboardingFailed(stage, Cause.TLS, f"TLS failure: {exc}", transient=False)
    if isinstance(exc, SessionTimeout):
        return OnboardingFailed(stage, Cause.TIMEOUT, f"timeout: {exc}", transient=True)
    if isinstance(exc, ConnectRefused):  # server busy, quota, ...
        return OnboardingFailed(
            stage, Cause.CONNECTION_LOST, f"connection refused: {exc}", transient=True
        )
    return OnboardingFailed(stage, Cause.CONNECTION_LOST, f"connection lost: {exc}", transient=True)


async def run_claim_flow(
    session: Session,
    flow: ClaimFlow,
    *,
    timeout: float = 10.0,
    retry: RetryPolicy | None = None,
    sleep: Sleep = asyncio.sleep,
) -> ProvisioningResult:
    """Drive ``flow`` over a connected claim session, retrying transient failures of a step.

    Raises ProvisioningRejected (permanent, or transient with retries exhausted),
    ProvisioningError for a malformed reply, and SessionError from the transport.
    """
    policy = retry or RetryPolicy()
    await session.subscribe(*flow.reply_topics())  # before the first publish
    request = flow.start()
    failures = 0
    while True:
        try:
            reply = await session.request(
                request.topic, request.payload, request.reply_topics, timeout
            )
            outcome = flow.receive(reply.topic, reply.payload)
        except (ProvisioningRejected, SessionTimeout) as exc:
            failures += 1
            delay = policy.delay(failures, exc)
            if delay is None:
                raise
            await sleep(delay)
            continue  # resend flow.pending: the same step
        failures = 0
        if isinstance(outcome, ProvisioningResult):
            return outcome
        request = outcome


async def prove_certificate(
    endpoint: str, port: int, context: ssl.SSLContext, thing_name: str, timeout: float = 10.0
) -> None:
    """Connect as the thing with its own certificate and subscribe to its shadow delta."""
    session = await connect(endpoint, port, client_id=thing_name, context=context, timeout=timeout)
    try:
        await session.subscribe(wire.shadow_delta(thing_name), timeout=timeout)
    finally:
        await session.disconnect()


async def onboard(settings: ClaimSettings, keystore: Keystore) -> Onboarded:
    """Provision one device by claim into ``keystore``; see the module docstring."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, keystore.ensure)
    except KeystoreError as exc:
        raise OnboardingFailed(Stage.PERSIST, Cause.STORAGE, str(exc), transient=False) from None

    if settings.key_type.startswith("rsa"):
        key = await loop.run_in_executor(None, generate_key, settings.key_type)
    else:
        key = generate_key(settings.key_type)
    try:
        flow = ClaimFlow(
            key,
            template=settings.template,
            parameters=settings.parameters,
            common_name=settings.common_name,
        )
    except ValueError as exc:
        raise OnboardingFailed(Stage.PROVISION, Cause.PROTOCOL, str(exc), transient=False) from None

    client_id = settings.claim_client_id or f"claim-{secrets.token_hex(8)}"
    try:
        claim = await connect(
            settings.endpoint,
            settings.port,
            client_id=client_id,
            context=settings.claim_context,
            timeout=settings.timeout,
        )
    except SessionError as exc:
        raise _session_failure(Stage.CLAIM_CONNECT, exc, claim=True) from None
    try:
        result = await run_claim_flow(claim, flow, timeout=settings.timeout, retry=settings.retry)
    except ProvisioningRejected as exc:
        raise OnboardingFailed(
            Stage.PROVISION,
            Cause.REJECTED,
            f"{exc.step.value} rejected: {exc.error_code} ({exc.status_code}): {exc.error_message}",
            transient=RetryPolicy.is_transient(exc),
            error_code=exc.error_code,
        ) from None
    except ProvisioningError as exc:
        raise OnboardingFailed(Stage.PROVISION, Cause.PROTOCOL, str(exc), transient=False) from None
    except SessionError as exc:
        raise _session_failure(Stage.PROVISION, exc, claim=True) from None
    finally:
        await claim.disconnect()

    record = ProvisioningRecord.now(
        result.thing_name, result.certificate_id, settings.endpoint, settings.port
    )
    try:
        await loop.run_in_executor(
            None, keystore.save_credentials, key, result.certificate_pem, record
        )
    except (KeystoreError, OSError) as exc:
        raise OnboardingFailed(
            Stage.PERSIST,
            Cause.STORAGE,
            f"registered thing {result.thing_name} but could not store its credentials in "
            f"{keystore.root}: {exc}",
            transient=False,
        ) from None

    try:
        # From the files just written: this proves what the device will use from now on.
        context = tls_context(settings.ca_file, keystore.cert_path, keystore.key_path)
        await prove_certificate(
            settings.endpoint, settings.port, context, result.thing_name, settings.timeout
        )
    except SessionError as exc:
        failure = _session_failure(Stage.VERIFY, exc, claim=False)
        raise OnboardingFailed(
            Stage.VERIFY,
            failure.cause,
            f"registered thing {result.thing_name} and stored its credentials in "
            f"{keystore.root}, but connecting with them failed: {failure}",
            transient=failure.transient,
        ) from None
    return Onboarded(result, record, time.monotonic() - started)
