"""The demo's attacks and its revocation, against the live broker side.

Every attack is made with credentials a real attacker could hold: a device's own certificate
(devices are onboarded by the demo, so one of them plays the compromised device) or the claim
certificate every device of the factory image shares. Each one must be refused by the broker
with a real MQTT reason code; the refusal is what the check reports.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent import wire
from agent.provisioning import ProvisioningRejected
from agent.session import (
    ConnectRefused,
    PublishRefused,
    Session,
    SessionError,
    SubscribeRefused,
    TlsFailure,
    TlsSource,
    connect,
)
from broker import bootstrap
from simulator.demo_agent import DemoAgent
from simulator.demo_operator import Operator
from simulator.demo_report import Report
from simulator.metrics import Recorder
from simulator.virtual_device import Counters, Target, VirtualDevice

KICK_TIMEOUT = 5.0
FLOOD_REQUESTS = 3000  # over the broker's 1,000-over-quota disconnect threshold
PROBES = 20


async def _refused_code(action: Callable[[], Awaitable[object]]) -> str:
    """What the broker answered to ``action``: a refusal's reason code, or "accepted"."""
    try:
        await action()
    except (SubscribeRefused, PublishRefused) as exc:
        return f"0x{exc.reason_code:02X}"
    except SessionError as exc:
        return f"error: {exc}"
    return "accepted"


def _is_refusal(code: str) -> bool:
    return code.startswith("0x")


async def _connect_as(target: Target, client_id: str, context: TlsSource) -> Session:
    return await connect(
        target.endpoint, target.port, client_id=client_id, context=context, timeout=5
    )


async def impostor(
    report: Report, target: Target, attacker: VirtualDevice, agent: DemoAgent, agent_thing: str
) -> None:
    """A device's certificate asks for the fleet-agent's client id: refused before the broker
    would hand over the session, so the real agent never notices."""
    assert attacker.context is not None
    before = await asyncio.to_thread(agent.status)
    try:
        session = await _connect_as(target, agent_thing, attacker.context)
    except ConnectRefused as exc:
        outcome = f"CONNACK 0x{exc.reason_code:02X} {exc.reason}"
        refused = True
    except SessionError as exc:
        outcome, refused = f"connection failed: {exc}", False
    else:
        await session.disconnect()
        outcome, refused = "accepted (BAD)", False
    await asyncio.sleep(0.5)  # a kick would show in the agent's state by now
    after = await asyncio.to_thread(agent.status)
    undisturbed = (
        before is not None
        and after is not None
        and after.get("state") == "connected"
        and after.get("connections") == before.get("connections")
    )
    report.check(
        "a certificate cannot take another device's client id",
        refused and undisturbed,
        f"{attacker.thing}'s certificate as client id {agent_thing}: {outcome}; the real "
        + (
            "fleet-agent stayed connected on its first connection"
            if undisturbed
            else f"fleet-agent was disturbed (status before {before}, after {after})"
        ),
    )


async def device_overreach(report: Report, attacker: VirtualDevice, agent_thing: str) -> None:
    """A device reaching for another thing's topics, and posing as the service."""
    session = attacker.session
    assert session is not None
    code = await _refused_code(lambda: session.subscribe(wire.shadow_delta(agent_thing)))
    report.check(
        "subscribing to another thing's topics is refused",
        _is_refusal(code),
        f"{attacker.thing} SUBSCRIBE {wire.shadow_delta(agent_thing)}: SUBACK {code}",
    )
    change = json.dumps({"state": {"desired": {"mode": "off"}}}).encode()
    topic = wire.shadow_topic(agent_thing, "update")
    code = await _refused_code(lambda: session.publish(topic, change))
    report.check(
        "changing another thing's shadow is refused",
        _is_refusal(code),
        f"{attacker.thing} PUBLISH {topic}: PUBACK {code}",
    )
    forged = json.dumps({"state": {"mode": "off"}, "version": 1_000_000}).encode()
    code = await _refused_code(lambda: session.publish(wire.shadow_delta(agent_thing), forged))
    report.check(
        "a device cannot forge a service reply",
        _is_refusal(code),
        f"a forged /update/delta to {agent_thing}: PUBACK {code}",
    )


async def claim_overreach(
    report: Report, target: Target, claim_context: ssl.SSLContext, agent_thing: str
) -> None:
    """The shared claim certificate may provision and nothing else."""
    try:
        session = await _connect_as(target, "claim-demo-probe", claim_context)
    except SessionError as exc:
        report.check("a claim certificate cannot use shadow topics", False, f"connect: {exc}")
        return
    try:
        sub = await _refused_code(lambda: session.subscribe(wire.shadow_delta(agent_thing)))
        get = await _refused_code(
            lambda: session.publish(wire.shadow_topic(agent_thing, "get"), b"{}")
        )
    finally:
        await session.disconnect()
    report.check(
        "a claim certificate cannot use shadow topics",
        _is_refusal(sub) and _is_refusal(get),
        f"claim SUBSCRIBE {agent_thing}'s delta: SUBACK {sub}; "
        f"PUBLISH its shadow get: PUBACK {get}",
    )


async def revocation(
    report: Report,
    target: Target,
    victim: VirtualDevice,
    operator: Operator,
    pki_root: Path,
    reload_crl: Callable[[], None] | None,
) -> None:
    """Revoke one device as `fleet-broker revoke` does: registry and CRL, a kick of its live
    connection by the plugin, a CRL reload. Measured from the revoke call to the disconnect.

    Without ``reload_crl`` (a broker in another container) Mosquitto reads the new CRL only at
    its next reload; the plugin's registry check at CONNECT refuses the certificate meanwhile,
    which the reconnect below shows."""
    session, thing, context = victim.session, victim.thing, victim.context
    assert session is not None and thing is not None and context is not None
    started = time.perf_counter()
    revoked = await asyncio.to_thread(bootstrap.revoke, pki_root, thing)
    await asyncio.to_thread(operator.kick, [r.id for r in revoked])
    if reload_crl is not None:
        reload_crl()
    try:
        await asyncio.wait_for(session.wait_closed(), KICK_TIMEOUT)
        kicked_ms: float | None = (time.perf_counter() - started) * 1000
    except asyncio.TimeoutError:
        kicked_ms = None
    report.shadow["revocation_ms"] = kicked_ms
    report.check(
        "a revoked device is disconnected at once",
        kicked_ms is not None,
        f"{thing} disconnected {kicked_ms:.0f} ms after revoke (registry, CRL, kick)"
        if kicked_ms is not None
        else f"{thing} still connected {KICK_TIMEOUT:.0f} s after revoke",
    )
    try:
        again = await _connect_as(target, thing, context)
    except (ConnectRefused, TlsFailure) as exc:
        detail, refused = f"refused: {exc}", True
    except SessionError as exc:
        detail, refused = f"failed otherwise: {exc}", False
    else:
        await again.disconnect()
        detail, refused = "accepted (BAD)", False
    if reload_crl is None and refused:
        detail += " (by the registry check; the broker reads the new CRL at its next reload)"
    report.check(
        "a revoked certificate cannot connect again", refused, f"{thing} reconnecting: {detail}"
    )


async def reregistration(
    report: Report, target: Target, claim_context: ssl.SSLContext, revoked: VirtualDevice
) -> None:
    """The revoked device was stolen and still carries the shared claim: it onboards its serial
    again. The thing is REVOKED, so RegisterThing is refused until an operator enables it."""
    again = VirtualDevice(
        revoked.serial,
        target,
        claim_context,
        Recorder(time.time()),
        Counters(),
        parameters=revoked.parameters,
    )
    try:
        await again.onboard()
    except ProvisioningRejected as exc:
        refused = exc.status_code == 403
        detail = f"RegisterThing {exc.error_code} ({exc.status_code}): {exc.error_message}"
    except SessionError as exc:
        refused, detail = False, f"failed otherwise: {exc}"
    else:
        await again.close()
        refused, detail = False, f"accepted (BAD): {again.thing} onboarded again"
    report.check(
        "a revoked thing cannot be registered again with the claim",
        refused,
        f"{revoked.thing} (serial {revoked.serial}) through the shared claim: {detail}",
    )


async def flood(report: Report, flooder: VirtualDevice, other: VirtualDevice) -> None:
    """One device floods its shadow topic with QoS 0 updates while another asks for its
    shadow: the broker's per-connection quota answers the flood with 429s and then a
    disconnect, and the other device's requests are all answered."""
    session, thing = flooder.session, flooder.thing
    probe, probe_thing = other.session, other.thing
    assert session is not None and thing is not None
    assert probe is not None and probe_thing is not None
    throttled = 0

    def count_429(message: object) -> None:
        nonlocal throttled
        payload = getattr(message, "payload", b"")
        throttled += b'"code":429' in payload

    session.route(wire.shadow_reply(thing, "update", wire.REJECTED), count_429)
    topic = wire.shadow_topic(thing, "update")

    async def send_flood() -> int:
        sent = 0
        for n in range(FLOOD_REQUESTS):
            if session.closed:
                break
            body = json.dumps({"state": {"reported": {"flood": n}}}).encode()
            try:
                await session.publish(topic, body, qos=0)
            except SessionError:
                break
            sent += 1
            if n % 100 == 99:
                await asyncio.sleep(0)  # the other devices share this event loop
        return sent

    async def probe_shadow() -> list[float]:
        answered = []
        get = wire.shadow_topic(probe_thing, "get")
        replies = (
            wire.shadow_reply(probe_thing, "get", wire.ACCEPTED),
            wire.shadow_reply(probe_thing, "get", wire.REJECTED),
        )
        for i in range(PROBES):
            started = time.perf_counter()
            token = json.dumps({"clientToken": f"probe-{i}"}).encode()
            try:
                await probe.request(get, token, replies, timeout=10)
            except SessionError:
                continue
            answered.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.02)
        return answered

    flood_task = asyncio.create_task(send_flood())
    latencies = await probe_shadow()
    sent = await flood_task
    try:
        await asyncio.wait_for(session.wait_closed(), KICK_TIMEOUT)
        disconnected = True
    except asyncio.TimeoutError:
        disconnected = False
    worst = f", slowest {max(latencies):.0f} ms" if latencies else ""
    report.check(
        "a flooding device is throttled and the others are answered",
        len(latencies) == PROBES and throttled > 0 and disconnected,
        f"{thing} sent {sent} QoS 0 updates at once: {throttled} answered 429 Too Many "
        f"Requests, {'then disconnected' if disconnected else 'NOT disconnected'}; meanwhile "
        f"{len(latencies)}/{PROBES} of {probe_thing}'s shadow gets answered{worst}",
    )
