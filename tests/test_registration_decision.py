"""RegisterThing's decision as a pure function (broker/registration.py): a plan and the
registry's facts in, the registration or a rejection out. No registry, no broker: each rule
of who may register which thing, one fact at a time. tests/test_provisioning_rules.py runs
the same rules through the service and a real registry, tests/test_attacks.py on the wire."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from broker.identity import Sender
from broker.registration import RegistrationFacts, RegistrationRules, decide
from broker.registry import (
    CertificateRecord,
    CertificateRole,
    CertificateStatus,
    Thing,
    ThingStatus,
)
from broker.rejection import Rejection
from broker.templates import CertificatePlan, PolicyPlan, ProvisioningPlan, ThingPlan

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.timezone.utc)
RULES = RegistrationRules(frozenset({"admin"}), ("claim-", "@"), dt.timedelta(seconds=60))
CLAIM = Sender("claim-1", "c1", "claim", "claim-cert", None)
OTHER_CLAIM = Sender("claim-2", "c2", "claim", "other-claim-cert", None)
NEW_CERT = "new-cert"
CONFLICT = (409, "ResourceConflictsException")


def plan(name: str | None = "dev-1", **thing: object) -> ProvisioningPlan:
    return ProvisioningPlan(
        thing=ThingPlan(name, **thing) if name is not None else None,  # type: ignore[arg-type]
        certificate=CertificatePlan(NEW_CERT),
        policies=[],
        device_configuration={},
        parameters={},
    )


def thing(name: str = "dev-1", **changes: object) -> Thing:
    made = Thing(name, {"a": "1"}, ("g1",), None, 1, NOW, NOW)
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


def certificate(cid: str, **changes: object) -> CertificateRecord:
    made = CertificateRecord(
        id=cid,
        pem="",
        serial="1",
        role=CertificateRole.DEVICE,
        status=CertificateStatus.ACTIVE,
        thing_name="dev-1",
        label=None,
        not_after=NOW + dt.timedelta(days=365),
        created_at=NOW - dt.timedelta(days=1),
        revoked_at=None,
    )
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


def facts(
    existing: Thing | None = None,
    other_active: tuple[CertificateRecord, ...] = (),
    caller_certificate: CertificateRecord | None = None,
) -> RegistrationFacts:
    return RegistrationFacts(NOW, existing, other_active, caller_certificate)


def refused(the_plan: ProvisioningPlan, caller: Sender, the_facts: RegistrationFacts) -> tuple:
    with pytest.raises(Rejection) as raised:
        decide(the_plan, "token", NEW_CERT, caller, the_facts, RULES)
    return raised.value.status_code, raised.value.error_code


def test_a_new_thing_by_claim_is_registered_active() -> None:
    registration = decide(plan(), "token", NEW_CERT, CLAIM, facts(), RULES)
    assert registration.thing_name == "dev-1"
    assert registration.certificate_status is CertificateStatus.ACTIVE
    assert registration.registered_by == "claim-cert"
    assert registration.renews is None and registration.supersedes == []


def test_a_template_without_a_thing_is_invalid() -> None:
    assert refused(plan(None), CLAIM, facts()) == (400, "InvalidParameters")


@pytest.mark.parametrize("name", ["admin", "claim-x", "@fleet.ops.1"])
def test_reserved_names_are_refused(name: str) -> None:
    assert refused(plan(name), CLAIM, facts()) == CONFLICT


def test_a_name_without_a_letter_or_digit_is_refused() -> None:
    assert refused(plan("-"), CLAIM, facts()) == (400, "InvalidParameters")


def test_a_device_registers_only_its_own_thing() -> None:
    device = Sender("dev-2", "d2", "device", "cert-2", "dev-2")
    assert refused(plan("dev-1"), device, facts(thing())) == (403, "AccessDenied")


def test_a_renewal_too_soon_is_throttled_and_a_later_one_renews() -> None:
    device = Sender("dev-1", "d1", "device", "cert-1", "dev-1")
    young = certificate("cert-1", created_at=NOW - dt.timedelta(seconds=10))
    assert refused(plan(), device, facts(thing(), (young,), young)) == (429, "Throttling")
    old = certificate("cert-1")
    registration = decide(plan(), "t", NEW_CERT, device, facts(thing(), (old,), old), RULES)
    assert registration.renews == "cert-1"


def test_a_short_lived_certificate_renews_after_half_its_life() -> None:
    device = Sender("dev-1", "d1", "device", "cert-1", "dev-1")
    short = certificate(
        "cert-1",
        created_at=NOW - dt.timedelta(seconds=40),
        not_after=NOW + dt.timedelta(seconds=20),  # 60 s in all: the floor is 30 s, not 60
    )
    registration = decide(plan(), "t", NEW_CERT, device, facts(thing(), (short,), short), RULES)
    assert registration.renews == "cert-1"


def test_a_revoked_thing_stays_out() -> None:
    revoked = thing(status=ThingStatus.REVOKED)
    assert refused(plan(), CLAIM, facts(revoked)) == (403, "AccessDenied")


def test_a_live_thing_belongs_to_its_device() -> None:
    live = certificate("cert-1", awaiting_first_connect=False)
    assert refused(plan(), CLAIM, facts(thing(), (live,))) == CONFLICT


def test_a_pending_thing_belongs_to_the_claim_that_registered_it() -> None:
    pending = certificate("cert-1", awaiting_first_connect=True, registered_by="claim-cert")
    assert refused(plan(), OTHER_CLAIM, facts(thing(), (pending,))) == (
        409,
        "ResourceConflictsException",
    )
    registration = decide(plan(), "t", NEW_CERT, CLAIM, facts(thing(), (pending,)), RULES)
    assert registration.supersedes == ["cert-1"]


def test_override_settings_for_an_existing_thing() -> None:
    merged = decide(
        plan(attributes={"b": "2"}, overrides={"AttributePayload": "MERGE"}),
        "t",
        NEW_CERT,
        CLAIM,
        facts(thing()),
        RULES,
    )
    assert merged.attributes == {"a": "1", "b": "2"}
    assert merged.thing_groups is None  # unspecified: DO_NOTHING
    forbidden = plan(thing_groups=["g2"], overrides={"ThingGroups": "FAIL"})
    assert refused(forbidden, CLAIM, facts(thing())) == CONFLICT


def test_the_template_may_make_the_certificate_inactive_and_attach_policies() -> None:
    the_plan = dataclasses.replace(
        plan(),
        certificate=CertificatePlan(NEW_CERT, status="INACTIVE"),
        policies=[PolicyPlan("P", name="fleet-device"), PolicyPlan("Q", document={"v": 1})],
    )
    registration = decide(the_plan, "t", NEW_CERT, CLAIM, facts(), RULES)
    assert registration.certificate_status is CertificateStatus.INACTIVE
    assert registration.policies == [("fleet-device", None), ("Q", '{"v": 1}')]
