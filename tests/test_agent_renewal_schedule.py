"""The renewal schedule as pure logic: when to renew, how long to wait after a failure."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.keystore import generate_key
from agent.renewal import RenewalPolicy, renewal_time, retry_delay
from broker.pki import CertificateAuthority

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(days=30)


def test_renewal_is_at_the_share_of_the_validity_period(ca: CertificateAuthority) -> None:
    certificate = ca.issue(generate_key().public_key(), common_name="d", days=10, purpose="client")
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    assert renewal_time(certificate, 0.8) == start + (end - start) * 0.8
    assert renewal_time(certificate, 0.5) < renewal_time(certificate, 0.8) < end
    # Days before expiry, not minutes: a device off for a day or two still renews in time.
    assert end - renewal_time(certificate, 0.8) > dt.timedelta(days=1)


def test_retry_delay_grows_to_the_cap_and_is_never_zero() -> None:
    policy = RenewalPolicy(retry_base=60, retry_cap=3600)
    assert retry_delay(1, policy, lambda: 0.0) == 30
    assert retry_delay(1, policy, lambda: 1.0) == 60
    assert retry_delay(3, policy, lambda: 1.0) == 240
    assert retry_delay(30, policy, lambda: 1.0) == 3600
    assert retry_delay(30, policy, lambda: 0.0) == 1800


def test_retry_delays_of_a_fleet_spread_out() -> None:
    import random

    rng = random.Random(7)
    delays = {round(retry_delay(4, RenewalPolicy(), rng.random)) for _ in range(200)}
    assert len(delays) > 100  # not in step
    assert min(delays) >= 240 and max(delays) <= 480


def test_renewal_counts_from_when_the_device_got_a_backdated_certificate(
    ca: CertificateAuthority,
) -> None:
    # Our CA backdates notBefore by 5 minutes; 80 % of that span of a 60 s certificate lies
    # before its issue, which made the agent renew in a loop.
    certificate = ca.issue(
        generate_key().public_key(),
        common_name="d",
        validity=dt.timedelta(seconds=60),
        purpose="client",
    )
    issued = certificate.not_valid_after_utc - dt.timedelta(seconds=60)
    assert certificate.not_valid_before_utc < issued - dt.timedelta(minutes=4)
    due = renewal_time(certificate, 0.8, obtained_at=issued)
    assert due == issued + dt.timedelta(seconds=48)
    # A schedule that would come too soon is held back to the floor.
    assert renewal_time(certificate, 0.05, obtained_at=issued, min_age=30) == issued + dt.timedelta(
        seconds=30
    )
    # An obtained_at outside the validity (a skewed clock) is not believed.
    far = certificate.not_valid_after_utc + dt.timedelta(days=1)
    assert renewal_time(certificate, 0.8, obtained_at=far) == renewal_time(certificate, 0.8)
