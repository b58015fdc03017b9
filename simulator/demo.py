"""The README's main job: a local fleet on this machine, end to end, with a report.

Brings up the broker side (PKI, Mosquitto with the plugin, services) in a fresh folder,
connects a small fleet over mutual TLS, has every device send a shadow request that reaches
the services stamped with its identity, tries the attacks the plugin exists to stop, revokes
one device, and prints what happened. Claim onboarding and shadow sync join this demo as the
provisioning and shadow services land; until then devices are registered directly.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.table import Table

from agent import wire
from broker import bootstrap
from broker.config import load_config
from broker.mosquitto import check_port_free, free_port
from broker.mqtt import ConnectError, connect, disconnect, tls_context
from broker.pki import (
    CertificateAuthority,
    generate_private_key,
    write_private_key,
    write_public_file,
)
from broker.registry import CertificateRole, CertificateStatus, SQLiteRegistry
from broker.stack import Stack


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append(Check(name, passed, detail))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _timed(report: Report, label: str, action: Callable[[], object]) -> object:
    started = time.perf_counter()
    result = action()
    report.timings[label] = time.perf_counter() - started
    return result


def run_demo(devices: int, folder: Path | None, port: int | None, console: Console) -> Report:
    workdir = folder or Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # the broker's user must reach the PKI folder when we are root
    report = Report()
    pki = _timed(
        report,
        "PKI + registry (fleet-broker init)",
        lambda: bootstrap.initialize(workdir / "certs", force=True),
    )
    port = port or free_port()
    check_port_free("127.0.0.1", port)
    config = load_config(pki.root, port=port, bind_address="127.0.0.1")
    stack = Stack(config)
    console.print(f"[bold]mqtt-fleet demo[/] in {workdir} - broker on mqtts://127.0.0.1:{port}")
    _timed(report, "broker + services up (fleet-broker up)", stack.start)
    try:
        _exercise(report, pki, config, devices, console)
    finally:
        stack.stop()
    return report


def _exercise(report: Report, pki, config, count: int, console: Console) -> None:
    ca = CertificateAuthority.load(pki)
    folder = pki.root / "demo-devices"
    folder.mkdir(exist_ok=True)
    names = [f"demo-device-{i:03d}" for i in range(count)]
    credentials: dict[str, tuple[Path, Path, str]] = {}
    with SQLiteRegistry.open(pki.registry) as registry:
        for name in names:
            key = generate_private_key()
            # The subject is deliberately not the thing name: identity comes from the registry.
            cert = ca.issue(
                key.public_key(), common_name=f"sensor {name[-3:]}", days=1, purpose="client"
            )
            key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
            write_private_key(key_path, key)
            write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            registry.create_or_update_thing(name, attributes={"model": "demo"})
            record = registry.add_certificate(
                cert, role=CertificateRole.DEVICE, status=CertificateStatus.ACTIVE, thing_name=name
            )
            credentials[name] = (cert_path, key_path, record.id)

    clients: dict[str, mqtt.Client] = {}
    started = time.perf_counter()
    for name in names:
        cert_path, key_path, _ = credentials[name]
        clients[name] = connect(
            "127.0.0.1",
            config.port,
            context=tls_context(pki.ca_cert, cert_path, key_path),
            client_id=name,
        )
    elapsed = time.perf_counter() - started
    report.timings[f"{count} devices connected (mutual TLS, sequential)"] = elapsed
    report.check(
        "devices connect with their own certificate",
        True,
        f"{count}/{count} CONNACK success, {count / elapsed:.0f} connects/s",
    )

    granted = sum(_suback(clients[n], wire.shadow_delta(n)) == 1 for n in names)
    report.check(
        "each device may subscribe to its own shadow topics",
        granted == count,
        f"{granted}/{count} SUBACK granted",
    )

    first, second = names[0], names[1 % count]
    foreign = _suback(clients[first], wire.shadow_delta("someone-else"))
    report.check(
        "subscribing to another thing's topics is refused",
        foreign == 0x87,
        f"SUBACK 0x{foreign:02x}",
    )

    forged = _puback(clients[first], wire.shadow_topic(first, "update") + "/accepted")
    report.check("a device cannot forge a service reply", forged == 0x87, f"PUBACK 0x{forged:02x}")

    cert_path, key_path, _ = credentials[first]
    try:
        impostor = connect(
            "127.0.0.1",
            config.port,
            context=tls_context(pki.ca_cert, cert_path, key_path),
            client_id=second,
            timeout=5,
        )
        disconnect(impostor)
        outcome = "accepted (BAD)"
    except ConnectError as exc:
        outcome = str(exc).split(": ")[-1]
    still_up = clients[second].is_connected()
    report.check(
        "a certificate cannot take another device's client id",
        outcome != "accepted (BAD)" and still_up,
        f"CONNACK {outcome}; the real {second} stays connected",
    )

    sunk = sum(
        _puback(clients[n], wire.shadow_topic(n, "update"), _report_state()) == 0x10 for n in names
    )
    # 0x10 "no matching subscribers": the plugin handed the request to the services and
    # sank the broadcast, so no other client could read it.
    report.check(
        "shadow requests go to the services only",
        sunk == count,
        f"{sunk}/{count} PUBACK 0x10: forwarded to the services, broadcast to no one",
    )

    # Revoke the last device: registry + CRL + kick, as `fleet-broker revoke` does.
    victim = names[-1]
    lost = threading.Event()
    clients[victim].on_disconnect = lambda *_: lost.set()
    clients[victim].reconnect_delay_set(60, 60)
    started = time.perf_counter()
    revoked = bootstrap.revoke(pki.root, victim)
    operator = connect(
        "127.0.0.1",
        config.port,
        context=tls_context(pki.ca_cert, pki.service_cert, pki.service_key),
        client_id="fleet-demo-operator",
    )
    operator.publish(
        wire.CONTROL_TOPIC, "\n".join(f"kick-certificate {r.id}" for r in revoked), qos=1
    )
    kicked = lost.wait(2)
    kick_ms = (time.perf_counter() - started) * 1000
    disconnect(operator)
    report.check(
        "a revoked device is disconnected at once",
        kicked,
        f"{victim} disconnected {kick_ms:.0f} ms after revoke",
    )
    for name, client in clients.items():
        if name != victim:
            disconnect(client)
        else:
            client.loop_stop()
    console.print(f"ran {len(report.checks)} checks against the live broker")


def _suback(client: mqtt.Client, topic: str) -> int:
    done = threading.Event()
    codes: list[int] = []

    def on_subscribe(_c: object, _u: object, _mid: int, reasons: list, _p: object) -> None:
        codes.extend(r.value for r in reasons)
        done.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    done.wait(5)
    return codes[0] if codes else -1


def _report_state() -> bytes:
    return json.dumps({"state": {"reported": {"demo": True}}}).encode()


def _puback(client: mqtt.Client, topic: str, payload: bytes = b"{}") -> int:
    done = threading.Event()
    codes: list[int] = []

    def on_publish(_c: object, _u: object, _mid: int, reason: object, _p: object) -> None:
        codes.append(getattr(reason, "value", 0))
        done.set()

    client.on_publish = on_publish
    client.publish(topic, payload, qos=1)
    done.wait(5)
    return codes[0] if codes else -1


def print_report(report: Report, console: Console) -> None:
    table = Table(title="mqtt-fleet demo: broker stack", show_lines=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for c in report.checks:
        table.add_row(c.name, "[green]pass[/]" if c.passed else "[red]FAIL[/]", c.detail)
    console.print(table)
    timings = Table(title="timings")
    timings.add_column("step")
    timings.add_column("seconds", justify="right")
    for label, seconds in report.timings.items():
        timings.add_row(label, f"{seconds:.2f}")
    console.print(timings)
    verdict = "[green]all checks passed[/]" if report.passed else "[red]some checks FAILED[/]"
    console.print(verdict)
