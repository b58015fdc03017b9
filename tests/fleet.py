"""Test helpers: a real broker-side stack on an ephemeral port, with a throw-away PKI, and
paho-mqtt clients over mutual TLS. Nothing here mocks the broker or TLS."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import bootstrap
from broker.config import BrokerConfig, load_config
from broker.mosquitto import free_port
from broker.pki import (
    CertificateAuthority,
    generate_private_key,
    write_private_key,
    write_public_file,
)
from broker.registry import CertificateRole, CertificateStatus, SQLiteRegistry
from broker.stack import Stack


def make_workdir() -> Path:
    """A temp folder the broker's dropped user (mosquitto, when we are root) can traverse."""
    path = Path(tempfile.mkdtemp(prefix="fleet-test-", dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path
    certificate_id: str = ""


@dataclass
class Received:
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    event: threading.Condition = field(default_factory=threading.Condition)

    def add(self, message: mqtt.MQTTMessage) -> None:
        with self.event:
            self.messages.append(message)
            self.event.notify_all()

    def wait_for(self, predicate, timeout: float = 5.0) -> mqtt.MQTTMessage | None:
        deadline = time.monotonic() + timeout
        with self.event:
            while True:
                for m in self.messages:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.event.wait(left)

    def topics(self) -> list[str]:
        with self.event:
            return [m.topic for m in self.messages]


class Client:
    """A paho client with what the tests look at: CONNACK, SUBACK codes, messages, disconnects."""

    def __init__(
        self,
        env: Fleet,
        creds: Credentials,
        client_id: str,
        *,
        protocol: int = mqtt.MQTTv5,
        clean_start: bool = True,
        session_expiry: int = 0,
        will: tuple[str, bytes, list[tuple[str, str]]] | None = None,
        will_retain: bool = False,
    ) -> None:
        self.client_id = client_id
        self.received = Received()
        self.connack: object = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason: object = None
        self._subacks: dict[int, list] = {}
        self.pubacks: dict[int, object] = {}
        self._suback_event = threading.Condition()
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.paho.tls_set_context(env.tls(creds))
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = lambda _c, _u, m: self.received.add(m)
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_publish = self._on_publish
        if will is not None:
            topic, payload, user_properties = will
            props = Properties(PacketTypes.WILLMESSAGE)
            if user_properties:
                props.UserProperty = user_properties
            self.paho.will_set(
                topic,
                payload,
                qos=1,
                retain=will_retain,
                properties=props if protocol == mqtt.MQTTv5 else None,
            )
        self.protocol = protocol
        self._connect_args = dict(clean_start=clean_start, session_expiry=session_expiry)
        self._env = env

    def _on_connect(self, _c, _u, _flags, reason, _props) -> None:
        self.connack = reason
        self.connected.set()

    def _on_disconnect(self, _c, _u, _flags, reason, _props) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_publish(self, _c, _u, mid, reason, _props) -> None:
        self.pubacks[mid] = reason

    def _on_subscribe(self, _c, _u, mid, reasons, _props) -> None:
        with self._suback_event:
            self._subacks[mid] = list(reasons)
            self._suback_event.notify_all()

    def start(self, timeout: float = 5.0) -> Client:
        kwargs: dict = {}
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._connect_args["session_expiry"]
            kwargs = {"clean_start": self._connect_args["clean_start"], "properties": props}
        else:
            self.paho._clean_session = self._connect_args["clean_start"]
        self.paho.reconnect_delay_set(30, 30)  # never reconnect by itself during a test
        self.paho.connect("127.0.0.1", self._env.config.port, 30, **kwargs)
        self.paho.loop_start()
        self.connected.wait(timeout)
        return self

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list:
        """SUBSCRIBE and return the SUBACK reason codes."""
        with self._suback_event:
            _, mid = self.paho.subscribe(topic, qos)
            deadline = time.monotonic() + timeout
            while mid not in self._subacks:
                left = deadline - time.monotonic()
                assert left > 0, f"no SUBACK for {topic}"
                self._suback_event.wait(left)
            return self._subacks[mid]

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"{}",
        qos: int = 1,
        user_properties: list[tuple[str, str]] | None = None,
        retain: bool = False,
    ):
        props = None
        if user_properties and self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = user_properties
        info = self.paho.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos:
            info.wait_for_publish(5)
            deadline = time.monotonic() + 5
            while info.mid not in self.pubacks and time.monotonic() < deadline:
                time.sleep(0.01)
        return info

    def puback(self, info: mqtt.MQTTMessageInfo) -> object:
        """The PUBACK reason code the broker sent for a QoS 1 publish."""
        return self.pubacks.get(info.mid)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT (the broker then sends the will)."""
        self.paho.loop_stop()
        sock = self.paho.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Fleet:
    """A running broker-side stack and the means to make identities and clients for it."""

    def __init__(self, workdir: Path, *, services: bool, broker_toml: str = "") -> None:
        self.workdir = workdir
        self.pki = bootstrap.initialize(workdir / "certs")
        if broker_toml:  # read by the services process too
            (self.pki.root / "broker.toml").write_text(broker_toml)
        self.config: BrokerConfig = load_config(
            self.pki.root, port=free_port(), bind_address="127.0.0.1", log_level="info"
        )
        self.stack = Stack(self.config, with_services=services)
        self.ca = CertificateAuthority.load(self.pki)
        self.claim = Credentials(self.pki.claim_cert, self.pki.claim_key)
        with self.registry() as registry:
            self.claim_certificate_id = next(
                r.id for r in registry.list_certificates(role=CertificateRole.CLAIM)
            )
        self.service = Credentials(self.pki.service_cert, self.pki.service_key)
        self._clients: list[Client] = []
        self._serial = 0

    def tls(self, creds: Credentials) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(creds.cert), str(creds.key))
        return context

    def registry(self) -> SQLiteRegistry:
        return SQLiteRegistry.open(self.pki.registry)

    def identity(
        self,
        role: CertificateRole,
        *,
        thing: str | None = None,
        status: CertificateStatus = CertificateStatus.ACTIVE,
        common_name: str | None = None,
        ca: CertificateAuthority | None = None,
        register: bool = True,
    ) -> Credentials:
        """A fresh key and certificate; registered (and attached to ``thing``) unless told not."""
        self._serial += 1
        key = generate_private_key()
        cert = (ca or self.ca).issue(
            key.public_key(),
            common_name=common_name or f"test-{self._serial}",
            days=1,
            purpose="client",
        )
        folder = self.workdir / "identities"
        folder.mkdir(exist_ok=True)
        key_path, cert_path = folder / f"{self._serial}.key", folder / f"{self._serial}.pem"
        write_private_key(key_path, key)
        write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        record_id = ""
        if register:
            with self.registry() as registry:
                if thing is not None:
                    registry.create_or_update_thing(thing)
                record = registry.add_certificate(cert, role=role, status=status, thing_name=thing)
                record_id = record.id
        return Credentials(cert_path, key_path, record_id)

    def device(self, thing: str, **kwargs) -> Credentials:
        return self.identity(CertificateRole.DEVICE, thing=thing, **kwargs)

    def client(self, creds: Credentials, client_id: str, **kwargs) -> Client:
        c = Client(self, creds, client_id, **kwargs).start()
        self._clients.append(c)
        return c

    def as_service(self, **kwargs) -> Client:
        """Connect as the fleet services process would (its identity and client id)."""
        return self.client(
            self.service,
            self.config.services_client_id,
            clean_start=False,
            session_expiry=3600,
            **kwargs,
        )

    def close_clients(self) -> None:
        for c in self._clients:
            c.stop()
        self._clients.clear()


@contextlib.contextmanager
def running_fleet(
    *, services: bool, templates: Mapping[str, object] | None = None, broker_toml: str = ""
) -> Iterator[Fleet]:
    """A started stack. ``templates`` maps file names to JSON documents written into the
    provisioning templates folder before the services start (templates and hooks);
    ``broker_toml`` is the broker side's config file."""
    fleet = Fleet(make_workdir(), services=services, broker_toml=broker_toml)
    if templates:
        folder = fleet.config.templates_dir
        folder.mkdir(parents=True, exist_ok=True)
        for name, document in templates.items():
            (folder / name).write_text(json.dumps(document))
    fleet.stack.start()
    try:
        yield fleet
    finally:
        fleet.close_clients()
        fleet.stack.stop()


REPO = Path(__file__).resolve().parent.parent


def agent_config(
    fleet: Fleet,
    serial: str | None,
    *,
    claim: tuple[Path, Path] | None = None,
    extra: str = "",
    provisioning: str = "timeout = 10",
    state: Path | None = None,
    shadow: str = "",
) -> Path:
    """An agent.toml for ``fleet``'s broker, in a fresh folder. ``shadow``: the body of its
    [shadow] section."""
    folder = make_workdir()
    cert, key = claim or (fleet.pki.claim_cert, fleet.pki.claim_key)
    parameters = f'\n[provisioning.parameters]\nSerialNumber = "{serial}"\n' if serial else ""
    path = folder / "agent.toml"
    path.write_text(
        f"""
[broker]
endpoint = "{fleet.config.connect_host}"
port = {fleet.config.port}
ca_file = "{fleet.pki.ca_cert}"

[claim]
certificate = "{cert}"
key = "{key}"
{extra}
[provisioning]
{provisioning}
{parameters}
[agent]
state_dir = "{state or folder / "state"}"

[shadow]
{shadow}
"""
    )
    return path


AGENT_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def fleet_agent(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``fleet-agent <args>`` as a real subprocess, to completion."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=REPO,
        env=AGENT_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_agent(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``fleet-agent provision --config <config>`` as a real subprocess."""
    return fleet_agent("provision", "--config", str(config), *args)


def start_agent_daemon(
    config: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen[str]:
    """``fleet-agent run --config <config>`` in the background; stop it with SIGTERM."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config), *args],
        cwd=REPO,
        env={**AGENT_ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_into_a_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with stdout a pipe whose reader is gone before the first byte, as
    ``command | head`` or ``command | true`` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            argv,
            cwd=REPO,
            env=AGENT_ENV,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=60,
        )
    finally:
        os.close(write_end)


def fleet_broker(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """``fleet-broker --dir <fleet's PKI> <args>`` as a real subprocess, to completion."""
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "--dir", str(fleet.pki.root), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
