"""RegisterThing's decision, pure: a template's plan and the registry's facts in, the
registration to write (or an AWS-style rejection) out.

`broker.provisioning` is the executor: it reads the facts (`RegistrationFacts`) from the
registry, calls `decide`, and writes what it returns in one transaction. Every rule about
who may register which thing lives here, so it is tested without a registry or a broker
(tests/test_provisioning_rules.py) and the attack tests exercise the same code on the wire:

- the template must create a thing, with a name no device could be confused by (reserved
  client-id spaces, at least one letter or digit);
- a device may only register certificates for its own thing, and not renew faster than
  `RegistrationRules.min_renewal_interval` (or half its certificate's lifetime);
- a revoked thing stays out until an operator enables it;
- a live thing (an ACTIVE certificate that connected) is only its own device's; a pending
  one (certificates that never connected: an onboarding that died before the device stored
  them) only the claim that registered it may register again, and those are retired;
- AWS's OverrideSettings for an existing thing (unspecified means DO_NOTHING).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from broker.identity import Sender
from broker.registry import (
    CertificateRecord,
    CertificateStatus,
    Registration,
    Thing,
    ThingRevoked,
    ThingStatus,
)
from broker.rejection import (
    Rejection,
    access_denied,
    conflict,
    invalid_parameters,
    throttled,
)
from broker.templates import ProvisioningPlan


@dataclass(frozen=True)
class RegistrationRules:
    reserved_thing_names: frozenset[str]
    reserved_thing_prefixes: tuple[str, ...]
    min_renewal_interval: dt.timedelta


@dataclass(frozen=True)
class RegistrationFacts:
    """What the registry says about the thing a plan names, as the executor read it."""

    now: dt.datetime
    existing: Thing | None
    #: The thing's ACTIVE certificates other than the one being registered.
    other_active: Sequence[CertificateRecord]
    #: The caller's own certificate, when the caller is a device (renewal pace).
    caller_certificate: CertificateRecord | None


def decide(
    plan: ProvisioningPlan,
    token: str,
    certificate_id: str,
    caller: Sender,
    facts: RegistrationFacts,
    rules: RegistrationRules,
) -> Registration:
    """The registration ``plan`` makes for ``certificate_id``, or raise a Rejection."""
    if plan.thing is None:
        raise Rejection(400, "InvalidParameters", "The template creates no AWS::IoT::Thing.")
    name = plan.thing.name
    check_name(name, rules)
    if caller.role == "device" and caller.thing != name:
        raise access_denied("A device may only register certificates for its own thing.")
    check_renewal_pace(caller, facts.caller_certificate, facts.now, rules)
    existing = facts.existing
    if existing is not None and existing.status is ThingStatus.REVOKED:
        raise access_denied(str(ThingRevoked(name)))
    attributes: Mapping[str, str] | None = dict(plan.thing.attributes)
    groups: list[str] | None = list(plan.thing.thing_groups)
    thing_type = plan.thing.thing_type
    orphans: list[str] = []
    if existing is not None:
        active = facts.other_active
        # A shared claim certificate must not let one device take over another's thing:
        # only that thing's own identity (renewal) may add a certificate to a live thing.
        if active and caller.thing != name:
            if not all(c.awaiting_first_connect for c in active):
                raise conflict(f"Thing {name} already exists with an active certificate.")
            if not all(c.registered_by == caller.certificate_id for c in active):
                raise conflict(
                    f"Thing {name} is being onboarded by another claim certificate; only "
                    "that claim may register it again until its device connects."
                )
            orphans = [c.id for c in active]
        attributes, groups, thing_type = overridden(plan, existing)
    # The thing's own device asking with its current certificate: a renewal.
    renews = (
        caller.certificate_id
        if caller.role == "device" and caller.certificate_id != certificate_id
        else None
    )
    status = CertificateStatus.ACTIVE
    if plan.certificate is not None and plan.certificate.status.upper() == "INACTIVE":
        status = CertificateStatus.INACTIVE
    return Registration(
        token=token,
        certificate_id=certificate_id,
        thing_name=name,
        certificate_status=status,
        attributes=attributes,
        thing_groups=groups,
        thing_type=thing_type,
        renews=renews,
        supersedes=orphans,
        registered_by=caller.certificate_id,
        policies=[
            (p.name or p.logical_id, json.dumps(p.document) if p.document else None)
            for p in plan.policies
        ],
    )


def check_name(name: str, rules: RegistrationRules) -> None:
    if name in rules.reserved_thing_names or name.startswith(rules.reserved_thing_prefixes):
        raise conflict(f"Thing name {name} is reserved.")
    if not any(ch.isalnum() for ch in name):
        # "-" from empty template parameters: no device could be told apart by it.
        raise invalid_parameters(
            f"Thing name {name!r} has no letter or digit; check the template's parameters "
            "(an empty DeviceModel or SerialNumber?)."
        )


def check_renewal_pace(
    caller: Sender,
    current: CertificateRecord | None,
    now: dt.datetime,
    rules: RegistrationRules,
) -> None:
    """A device renews no faster than the rules allow (429 with the wait, else)."""
    if caller.role != "device" or current is None:
        return
    age = now - current.created_at
    floor = min(rules.min_renewal_interval, (current.not_after - current.created_at) / 2)
    if age < floor:
        wait = (floor - age).total_seconds()
        raise throttled(
            f"Certificate renewal too soon: the current certificate is "
            f"{age.total_seconds():.0f} s old; renew in {wait:.0f} s at the earliest."
        )


def overridden(
    plan: ProvisioningPlan, existing: Thing
) -> tuple[Mapping[str, str] | None, list[str] | None, str | None]:
    """AWS OverrideSettings for an existing thing; unspecified means DO_NOTHING (None)."""
    assert plan.thing is not None
    overrides = plan.thing.overrides
    name = plan.thing.name

    def setting(prop: str) -> str:
        value = overrides.get(prop, "DO_NOTHING").upper()
        if value == "FAIL":
            raise conflict(f"Thing {name} exists and the template forbids changing {prop}.")
        return value

    attributes: Mapping[str, str] | None = None
    match setting("AttributePayload"):
        case "REPLACE":
            attributes = dict(plan.thing.attributes)
        case "MERGE":
            attributes = {**existing.attributes, **plan.thing.attributes}
    groups: list[str] | None = None
    match setting("ThingGroups"):
        case "REPLACE":
            groups = list(plan.thing.thing_groups)
        case "MERGE":
            groups = list(dict.fromkeys([*existing.thing_groups, *plan.thing.thing_groups]))
    thing_type = plan.thing.thing_type if setting("ThingTypeName") == "REPLACE" else None
    return attributes, groups, thing_type
