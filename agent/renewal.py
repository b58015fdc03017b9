"""Certificate renewal with the device's own identity.

Long before the certificate expires (by default at 80 % of its validity) the agent makes a new
key and CSR and, over its live session, asks for a certificate for the same thing through the
Fleet Provisioning API (CreateCertificateFromCsr + RegisterThing, as on AWS IoT Core, whose
policy must allow the thing's own certificate on those topics). The new set is staged beside
the current one (agent/keystore.py); the next connection is made with it, and only once the
broker has accepted it is it switched in. A refused new certificate is discarded and the old
one kept; failures are retried with jittered exponential backoff. The broker side retires the
old certificate when the new one first connects.

`Renewer` holds the schedule and the state shown by ``fleet-agent status``; the runtime drives
it (agent/runtime.py), ``fleet-agent renew`` forces it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from agent.keystore import Keystore, KeystoreError, KeyType, Provisioned, ProvisioningRecord
from agent.keystore import generate_key as make_key
from agent.onboarding import run_claim_flow
from agent.provisioning import (
    DEFAULT_COMMON_NAME,
    DEFAULT_TEMPLATE,
    ClaimFlow,
    ProvisioningError,
    ProvisioningRejected,
    RetryPolicy,
)
from agent.session import Session, SessionError

log = logging.getLogger("fleet.agent.renewal")


@dataclass(frozen=True)
class RenewalPolicy:
    enabled: bool = True
    share: float = 0.8  # of the certificate's lifetime, from when the device got it
    #: Never renew a certificate younger than this, whatever its lifetime: a schedule that
    #: comes out in the past (a short lifetime, a skewed clock) must not renew in a loop.
    min_age: float = 30.0
    retry_base: float = 60.0  # seconds; doubles per failure, with jitter
    retry_cap: float = 3600.0


@dataclass(frozen=True)
class RenewalRequest:
    """What to ask the provisioning API for: the same template and parameters that
    provisioned the device, so the template resolves to the same thing."""

    endpoint: str
    port: int
    template: str = DEFAULT_TEMPLATE
    parameters: Mapping[str, str] = field(default_factory=dict)
    key_type: KeyType = "ec-p256"
    common_name: str = DEFAULT_COMMON_NAME
    timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(max_attempts=3))


class RenewalFailed(Exception):
    """One line for the operator; never carries a key or a token."""


# ----------------------------------------------------------------------- pure schedule


def renewal_time(
    certificate: x509.Certificate,
    share: float,
    *,
    obtained_at: dt.datetime | None = None,
    min_age: float = RenewalPolicy.min_age,
) -> dt.datetime:
    """When ``share`` of the certificate's real lifetime has passed, and never less than
    ``min_age`` seconds after it was obtained.

    The lifetime runs from when the device got the certificate (``obtained_at``, its
    provisioning record), not from notBefore: CAs backdate notBefore for clock skew (ours by
    5 minutes), which for a 60 s certificate put 80 % of notBefore..notAfter before its issue
    and made the agent renew in a loop."""
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if obtained_at is not None and start < obtained_at < end:
        start = obtained_at
    return max(start + (end - start) * share, start + dt.timedelta(seconds=min_age))


def obtained_at(record: ProvisioningRecord | None) -> dt.datetime | None:
    """When the device stored this certificate (None if the record does not say)."""
    if record is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(record.provisioned_at)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def retry_delay(
    failures: int, policy: RenewalPolicy, rng: Callable[[], float] = random.random
) -> float:
    """Exponential in the number of failures, capped, with the upper half jittered: never a
    zero wait, and a fleet whose broker refused renewals at once does not retry in step."""
    ceiling = min(policy.retry_cap, policy.retry_base * 2 ** max(0, failures - 1))
    return float(ceiling / 2 + rng() * ceiling / 2)


# ----------------------------------------------------------------------------- steps


async def obtain(
    session: Session, keystore: Keystore, thing: str, request: RenewalRequest
) -> Provisioned:
    """Get a certificate for ``thing`` over ``session`` (connected as the thing) and stage it
    with its new key. Raises RenewalFailed."""
    loop = asyncio.get_running_loop()
    if request.key_type.startswith("rsa"):
        key = await loop.run_in_executor(None, make_key, request.key_type)
    else:
        key = make_key(request.key_type)
    flow = ClaimFlow(
        key,
        template=request.template,
        parameters=request.parameters,
        common_name=request.common_name,
    )
    try:
        result = await run_claim_flow(session, flow, timeout=request.timeout, retry=request.retry)
    except ProvisioningRejected as exc:
        raise RenewalFailed(str(exc)) from None
    except (ProvisioningError, SessionError) as exc:
        raise RenewalFailed(f"{type(exc).__name__}: {exc}") from None
    if result.thing_name != thing:
        # The broker refuses this (a device registers its own thing only); never trust it.
        raise RenewalFailed(
            f"template {request.template} resolved to thing {result.thing_name}, not "
            f"{thing}; check provisioning.parameters"
        )
    record = ProvisioningRecord.now(thing, result.certificate_id, request.endpoint, request.port)
    try:
        await loop.run_in_executor(None, keystore.stage, key, result.certificate_pem, record)
        staged = await loop.run_in_executor(None, keystore.staged)
    except (KeystoreError, OSError) as exc:
        raise RenewalFailed(f"cannot stage the new credentials in {keystore.root}: {exc}") from None
    if staged is None:
        raise RenewalFailed(f"the staged credentials in {keystore.root} did not read back")
    return staged


# ---------------------------------------------------------------------------- state


class Renewer:
    """The renewal schedule of one device and what ``fleet-agent status`` shows of it."""

    def __init__(
        self,
        keystore: Keystore,
        thing: str,
        request: RenewalRequest,
        policy: RenewalPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.keystore = keystore
        self.thing = thing
        self.request = request
        self.policy = policy or RenewalPolicy()
        self._clock = clock
        self._rng = rng
        self.failures = 0
        self.next_retry: float | None = None
        self.last_error: str | None = None
        self.last_renewed: float | None = None
        self._forced = False
        self._wake: asyncio.Event | None = None
        self._waiters: list[asyncio.Future[Provisioned]] = []

    # -------------------------------------------------------------- schedule

    def certificate(self) -> x509.Certificate:
        return self.keystore.load_certificate()

    def due_at(self) -> float | None:
        """Wall-clock time of the next attempt; None if renewal is off and none is asked."""
        if self._forced:
            return self._clock()
        if not self.policy.enabled:
            return None
        planned = renewal_time(
            self.certificate(),
            self.policy.share,
            obtained_at=obtained_at(self.keystore.load_record()),
            min_age=self.policy.min_age,
        ).timestamp()
        if self.next_retry is not None:
            return max(planned, self.next_retry)
        return planned

    def _event(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    async def wait_due(self) -> None:
        """Return when a renewal should be attempted (now, or when forced)."""
        wake = self._event()
        while True:
            due = self.due_at()
            delay = None if due is None else due - self._clock()
            if delay is not None and delay <= 0:
                return
            wake.clear()
            # Sleep in slices of at most an hour: a suspended device wakes to a new clock.
            # (asyncio.wait, not wait_for: the latter can swallow a cancellation before 3.12.)
            waiter = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=None if delay is None else min(delay, 3600))
            finally:
                waiter.cancel()

    def force(self) -> asyncio.Future[Provisioned]:
        """``fleet-agent renew``: renew now; the future resolves once switched (or fails)."""
        future: asyncio.Future[Provisioned] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._forced = True
        self.next_retry = None
        self._event().set()
        return future

    # --------------------------------------------------------------- outcomes

    async def renew(self, session: Session) -> Provisioned:
        """Obtain and stage a new certificate over ``session``. Raises RenewalFailed (and
        schedules the retry)."""
        current = self.keystore.load_record()
        log.info(
            "renewing the certificate of %s (%s…)",
            self.thing,
            current.certificate_id[:12] if current else "?",
        )
        try:
            staged = await obtain(session, self.keystore, self.thing, self.request)
        except RenewalFailed as exc:
            self.failed(str(exc))
            raise
        log.info("staged certificate %s…; connecting with it", staged.record.certificate_id[:12])
        return staged

    def staged(self) -> Provisioned | None:
        return self.keystore.staged()

    def proven(self) -> Provisioned:
        """The broker accepted the staged certificate: switch to it for good."""
        provisioned = self.keystore.commit_staged()
        self._forced = False
        self.failures = 0
        self.next_retry = None
        self.last_error = None
        self.last_renewed = self._clock()
        expires = self.certificate().not_valid_after_utc.isoformat()
        log.info(
            "renewed the certificate of %s: now %s…, valid until %s",
            self.thing,
            provisioned.record.certificate_id[:12],
            expires,
        )
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(provisioned)
        self._waiters.clear()
        return provisioned

    def refused(self, reason: str) -> None:
        """The broker refused the staged certificate: keep the old one, retry later."""
        self.keystore.discard_staged()
        self.failed(f"the broker refused the renewed certificate ({reason}); kept the old one")

    def failed(self, reason: str) -> None:
        self._forced = False
        self.failures += 1
        delay = retry_delay(self.failures, self.policy, self._rng)
        self.next_retry = self._clock() + delay
        self.last_error = reason
        log.error("certificate renewal failed: %s; next attempt in %.0f s", reason, delay)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RenewalFailed(reason))
        self._waiters.clear()

    def status(self) -> dict[str, Any]:
        certificate = self.certificate()
        return {
            "enabled": self.policy.enabled,
            "not_before": certificate.not_valid_before_utc.timestamp(),
            "not_after": certificate.not_valid_after_utc.timestamp(),
            "renew_at": self.due_at(),
            "failures": self.failures,
            "last_error": self.last_error,
            "last_renewed": self.last_renewed,
        }
