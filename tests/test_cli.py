"""`fleet-broker` as a user meets it: the command line run as a real subprocess, against a real
Mosquitto with the plugin, the fleet services and a throw-away PKI.

Every test cleans up every process it started, also when it fails: `up` runs in its own process
group, and the broker and services pids it records are killed if they outlive it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import bootstrap
from broker.pki import (
    CertificateAuthority,
    PkiPaths,
    generate_private_key,
    write_private_key,
    write_public_file,
)
from broker.registry import CertificateRole, CertificateStatus
from broker.stack import pid_alive
from tests.fleet import free_port, make_workdir, run_into_a_closed_pipe

pytestmark = pytest.mark.commands

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLI_TIMEOUT = 30  # generous bound for one command; a hang fails the test instead of blocking
START_TIMEOUT = 30  # until `up` prints its endpoint
STOP_TIMEOUT = 20  # `up` must exit this long after SIGTERM / SIGINT


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = make_workdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def certs(workdir: Path) -> Path:
    """An initialised PKI folder."""
    folder = workdir / "certs"
    result = cli(folder, "init")
    assert result.returncode == 0, result.stderr
    return folder


def command(certs: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "broker.cli", "--dir", str(certs), *args]


def cli(certs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one fleet-broker command to completion (killed if it outlives CLI_TIMEOUT)."""
    return subprocess.run(
        command(certs, *args),
        cwd=REPO,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Non-zero exit, exactly one stderr line, no traceback; returns that line."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def run_state(certs: Path) -> dict:
    return json.loads((certs / "run" / "fleet-broker.json").read_text())


@dataclass
class Up:
    """A `fleet-broker up` subprocess, its stdout read line by line in a thread."""

    certs: Path
    port: int
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    stdout: list[str] = field(default_factory=list)
    state: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_endpoint(self) -> None:
        """Until the endpoint line; then remember the pids it recorded for status and down."""
        wanted = f"mqtts://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"`up` printed no endpoint within {START_TIMEOUT} s: {self.stdout}")
            if line is None:
                self.process.wait(5)
                pytest.fail(
                    f"`up` exited ({self.process.returncode}) before printing its endpoint:\n"
                    + "".join(self.stdout)
                    + self.stderr()
                )
            self.stdout.append(line)
            if wanted in line:
                break
        self.state = run_state(self.certs)

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()

    def cleanup(self) -> None:
        """Stop `up` politely, then by force; then anything it left behind."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for key in ("mosquitto_pid", "services_pid"):
            pid = self.state.get(key, 0)
            if pid and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # each runs in its own session
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def fleet_up(certs: Path, *extra: str) -> Iterator[Up]:
    port = free_port()
    process = subprocess.Popen(
        command(certs, "up", "--port", str(port), "--bind", "127.0.0.1", *extra),
        cwd=REPO,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # our own group: killpg on failure reaches only it
    )
    up = Up(certs, port, process)
    try:
        up.wait_endpoint()
        yield up
    finally:
        up.cleanup()


class Device:
    """A paho MQTT 5 client over mutual TLS that records CONNACK and disconnects."""

    def __init__(self, certs: Path, cert: Path, key: Path, client_id: str) -> None:
        context = ssl.create_default_context(cafile=str(PkiPaths(certs).ca_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert), str(key))
        self.connack: object = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=5)
        self.paho.tls_set_context(context)
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = lambda *_: self.disconnected.set()
        self.paho.reconnect_delay_set(60, 60)  # no automatic reconnect during a test

    def _on_connect(self, _c, _u, _f, reason, _p) -> None:
        self.connack = reason
        self.connected.set()

    def start(self, port: int) -> Device:
        """Connect and wait for the CONNACK or the end of the connection (raises OSError/SSL)."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0
        self.paho.connect("127.0.0.1", port, 30, clean_start=True, properties=properties)
        self.paho.loop_start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.connected.is_set() or self.disconnected.is_set():
                break
            time.sleep(0.02)
        return self

    @property
    def accepted(self) -> bool:
        return (
            self.connack is not None
            and not self.connack.is_failure
            and not self.disconnected.is_set()
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()


def make_device(certs: Path, workdir: Path, thing: str) -> tuple[Path, Path, x509.Certificate]:
    """A device certificate attached to ``thing`` in the registry, as tests.fleet.Fleet does."""
    paths = PkiPaths(certs)
    ca = CertificateAuthority.load(paths)
    key = generate_private_key()
    cert = ca.issue(key.public_key(), common_name=f"{thing}-cert", days=1, purpose="client")
    folder = workdir / "identities"
    folder.mkdir(exist_ok=True)
    key_path, cert_path = folder / f"{thing}.key", folder / f"{thing}.pem"
    write_private_key(key_path, key)
    write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    with bootstrap.open_registry(paths) as registry:
        registry.create_or_update_thing(thing)
        registry.add_certificate(
            cert, role=CertificateRole.DEVICE, status=CertificateStatus.ACTIVE, thing_name=thing
        )
    return cert_path, key_path, cert


# --------------------------------------------------------------------------------------- init


def test_init_creates_the_pki_and_says_what_next(workdir: Path) -> None:
    certs = workdir / "certs"
    result = cli(certs, "init")
    assert result.returncode == 0, result.stderr
    assert "Next: fleet-broker up" in result.stdout
    for name in (
        "ca.pem",
        "broker.pem",
        "broker.key",
        "claim.pem",
        "claim.key",
        "service.pem",
        "service.key",
        "crl.pem",
        "broker.toml",
        "registry/registry.db",
    ):
        assert (certs / name).is_file(), name
    for key in ("broker.key", "claim.key", "service.key", "ca.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600, key


def test_second_init_needs_force(certs: Path) -> None:
    ca_before = (certs / "ca.pem").read_bytes()
    line = assert_one_line_error(cli(certs, "init"))
    assert "--force" in line
    assert (certs / "ca.pem").read_bytes() == ca_before, "a refused init changed the CA"

    result = cli(certs, "init", "--force")
    assert result.returncode == 0, result.stderr
    assert (certs / "ca.pem").read_bytes() != ca_before


def test_init_puts_extra_hosts_in_the_broker_certificate(workdir: Path) -> None:
    certs = workdir / "certs"
    result = cli(certs, "init", "--host", "10.1.2.3", "--host", "broker.example")
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((certs / "broker.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.example" in sans.get_values_for_type(x509.DNSName)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    ips = sans.get_values_for_type(x509.IPAddress)
    assert ip_address("10.1.2.3") in ips
    assert ip_address("127.0.0.1") in ips


def test_a_host_name_is_added_without_init_force_and_devices_keep_working(certs: Path) -> None:
    ca_before = (certs / "ca.pem").read_bytes()
    registry_before = (certs / "registry" / "registry.db").read_bytes()
    result = cli(certs, "broker-cert", "--host", "vm.example", "--host", "10.9.8.7")
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((certs / "broker.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "vm.example"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {ip_address("127.0.0.1"), ip_address("10.9.8.7")} <= set(
        sans.get_values_for_type(x509.IPAddress)
    )
    assert (certs / "ca.pem").read_bytes() == ca_before  # the same CA: no device is touched
    assert (certs / "registry" / "registry.db").read_bytes() == registry_before
    assert stat.S_IMODE((certs / "broker.key").stat().st_mode) == 0o600
    for hint in pasted_hints(result.stdout):
        build_parser_for_test().parse_args(hint)


def build_parser_for_test():
    from broker.cli import build_parser

    return build_parser()


# ----------------------------------------------------------------------------- claims, lists


def test_issue_claim_batch_and_listings(certs: Path) -> None:
    result = cli(certs, "issue-claim", "batch1", "--count", "3")
    assert result.returncode == 0, result.stderr
    folder = certs / "claims" / "batch1"
    pems = sorted(folder.glob("*.pem"))
    keys = sorted(folder.glob("*.key"))
    assert len(pems) == 3 and len(keys) == 3, sorted(p.name for p in folder.iterdir())
    assert {p.stem for p in pems} == {k.stem for k in keys}
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key

    listing = cli(certs, "certs")
    assert listing.returncode == 0, listing.stderr
    assert sum("batch1" in line for line in listing.stdout.splitlines()) == 3, listing.stdout

    things = cli(certs, "things")
    assert things.returncode == 0, things.stderr
    assert "0 thing(s)" in things.stdout


def test_issue_claim_refuses_a_bad_name(certs: Path) -> None:
    line = assert_one_line_error(cli(certs, "issue-claim", "bad name!"))
    assert "bad name!" in line and "invalid" in line
    assert not (certs / "claims" / "bad name!").exists()


def test_certs_lists_role_and_status_values(certs: Path) -> None:
    listing = cli(certs, "certs")
    assert listing.returncode == 0, listing.stderr
    assert "CertificateRole." not in listing.stdout
    assert "CertificateStatus." not in listing.stdout


# ------------------------------------------------------------------------------ input errors


def test_up_without_pki_says_init(workdir: Path) -> None:
    port = free_port()
    result = cli(workdir / "nothing-here", "up", "--port", str(port), "--bind", "127.0.0.1")
    line = assert_one_line_error(result)
    assert "fleet-broker init" in line


def test_up_on_a_busy_port_says_so(certs: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli(certs, "up", "--port", str(port), "--bind", "127.0.0.1")
    line = assert_one_line_error(result)
    assert str(port) in line and "in use" in line
    assert not (certs / "run" / "fleet-broker.json").exists()


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ('[broker]\nport = 8883\nbind_address = "127.0.0.1\n', "TOML"),  # unterminated string
        ("[broker]\nprot = 1\n", "prot"),
        ('[broker]\nport = "x"\n', "port"),
    ],
    ids=["invalid-toml", "unknown-key", "wrong-type"],
)
def test_broken_broker_toml_names_file_and_key(certs: Path, content: str, key: str) -> None:
    config = certs / "broker.toml"
    config.write_text(content)
    line = assert_one_line_error(cli(certs, "up", "--port", str(free_port())))
    assert str(config) in line
    assert key in line


def test_revoke_unknown_target(certs: Path) -> None:
    line = assert_one_line_error(cli(certs, "revoke", "nosuchthing"))
    assert "nosuchthing" in line
    assert "neither a thing name nor a certificate id" in line


def test_revoke_unknown_target_hint_names_a_real_command(certs: Path) -> None:
    line = assert_one_line_error(cli(certs, "revoke", "nosuchthing"))
    assert "fleet-broker list" not in line


def test_broker_failing_to_start_shows_its_log(certs: Path) -> None:
    (certs / "broker.pem").write_text("garbage, not a certificate\n")
    result = cli(certs, "up", "--port", str(free_port()), "--bind", "127.0.0.1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    # Mosquitto's own words, e.g. 'Error: Unable to load server certificate "...". Check certfile.'
    assert "Unable to load server certificate" in result.stderr, result.stderr
    assert str(certs / "broker.pem") in result.stderr
    assert not (certs / "run" / "fleet-broker.json").exists()
    # And nothing was left listening or running.
    assert status_not_running(certs)


# ---------------------------------------------------------------------------- the lifecycle


def status_not_running(certs: Path) -> bool:
    result = cli(certs, "status")
    return result.returncode == 3 and "not running" in result.stdout


def assert_status_running(up: Up) -> None:
    result = cli(up.certs, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "mosquitto  running" in out, out
    assert f"127.0.0.1:{up.port}" in out, out
    assert "clients" in out and "unknown" not in out, out


def assert_stopped_cleanly(up: Up) -> None:
    assert up.process.wait(STOP_TIMEOUT) == 0, up.stderr()
    for key in ("mosquitto_pid", "services_pid"):
        assert not pid_alive(up.state[key]), f"{key} {up.state[key]} outlived `up`"
    assert not (up.certs / "run" / "fleet-broker.json").exists()
    assert status_not_running(up.certs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_up_status_connect_and_stop_by_signal(certs: Path, signum: signal.Signals) -> None:
    with fleet_up(certs) as up:
        assert up.state["port"] == up.port
        assert pid_alive(up.state["mosquitto_pid"]) and pid_alive(up.state["services_pid"])
        assert_status_running(up)

        paths = PkiPaths(certs)
        service = Device(certs, paths.service_cert, paths.service_key, "test-service-probe")
        try:
            service.start(up.port)
            assert service.accepted, f"service identity refused: {service.connack}"
        finally:
            service.stop()

        os.kill(up.process.pid, signum)
        assert_stopped_cleanly(up)


def test_second_up_is_refused_and_down_stops(certs: Path) -> None:
    with fleet_up(certs) as up:
        other = cli(certs, "up", "--port", str(free_port()), "--bind", "127.0.0.1")
        line = assert_one_line_error(other)
        assert "already running" in line
        assert up.process.poll() is None, "the refused second `up` disturbed the first"
        assert run_state(certs) == up.state
        assert_status_running(up)

        # `down` waits for the `up` pid to vanish: reap `up` meanwhile, as a shell would
        # (an unreaped zombie still answers kill(pid, 0)).
        down = subprocess.Popen(
            command(certs, "down"),
            cwd=REPO,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert up.process.wait(STOP_TIMEOUT) == 0, up.stderr()
            out, err = down.communicate(timeout=CLI_TIMEOUT)
        finally:
            if down.poll() is None:
                down.kill()
                down.communicate()
        assert down.returncode == 0, err
        assert "stopped" in out
        assert_stopped_cleanly(up)

    again = cli(certs, "down")
    assert again.returncode == 0 and "not running" in again.stdout


def test_revoke_disconnects_a_live_device_and_refuses_it_after(certs: Path, workdir: Path) -> None:
    thing = "sensor-0001"
    cert_path, key_path, cert = make_device(certs, workdir, thing)
    with fleet_up(certs) as up:
        device = Device(certs, cert_path, key_path, thing).start(up.port)
        retry: Device | None = None
        try:
            assert device.accepted, f"device refused before revocation: {device.connack}"

            result = cli(certs, "revoke", thing)
            assert result.returncode == 0, result.stderr
            assert "revoked certificate" in result.stdout, result.stdout
            assert "disconnected" in result.stdout, result.stdout
            assert device.disconnected.wait(2), "revoked device still connected"

            crl = x509.load_pem_x509_crl((certs / "crl.pem").read_bytes())
            assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

            retry = Device(certs, cert_path, key_path, thing)
            # TLS may refuse the revoked certificate outright (an exception here), or the
            # handshake completes and the broker closes the connection / refuses CONNECT.
            with contextlib.suppress(OSError, ssl.SSLError):
                retry.start(up.port)
            assert not retry.accepted, "a revoked device reconnected"

            assert up.process.poll() is None, "the broker side died during revocation"
            assert_status_running(up)
        finally:
            device.stop()
            if retry is not None:
                retry.stop()


def test_operator_commands_reach_a_broker_that_runs_elsewhere(certs: Path, workdir: Path) -> None:
    """docker compose: the broker runs in another container, sharing only the folder. Without
    a local run state, --endpoint names it: revoke disconnects the device there (no SIGHUP is
    possible, so the registry check at CONNECT is what refuses it from then on), and shadow
    reads and changes shadows there."""
    thing = "sensor-0002"
    cert_path, key_path, _ = make_device(certs, workdir, thing)
    with fleet_up(certs) as up:
        state_file = certs / "run" / "fleet-broker.json"
        hidden = state_file.with_name("elsewhere.json")
        state_file.rename(hidden)  # as seen from another container: no broker runs here
        device = Device(certs, cert_path, key_path, thing).start(up.port)
        retry: Device | None = None
        try:
            assert device.accepted, f"device refused before revocation: {device.connack}"
            result = cli(certs, "revoke", thing, "--endpoint", "127.0.0.1", "--port", str(up.port))
            assert result.returncode == 0, result.stderr
            assert "disconnected" in result.stdout and "HUP" in result.stdout, result.stdout
            assert device.disconnected.wait(2), "revoked device still connected"
            retry = Device(certs, cert_path, key_path, thing)
            with contextlib.suppress(OSError, ssl.SSLError):
                retry.start(up.port)
            assert not retry.accepted, "a revoked device reconnected before any CRL reload"

            other = "sensor-0003"
            make_device(certs, workdir, other)
            told = cli(certs, "revoke", other)  # no --endpoint, no local broker: says what to do
            assert told.returncode == 0, told.stderr
            assert "--endpoint" in told.stdout, told.stdout

            there = ("--endpoint", "127.0.0.1", "--port", str(up.port))
            desired = cli(certs, "shadow", "desire", thing, "mode=eco", *there)
            assert desired.returncode == 0, desired.stderr
            shown = cli(certs, "shadow", "get", thing, *there)
            assert json.loads(shown.stdout)["state"]["desired"] == {"mode": "eco"}
            line = assert_one_line_error(cli(certs, "shadow", "get", thing))
            assert "--endpoint" in line
        finally:
            hidden.rename(state_file)
            device.stop()
            if retry is not None:
                retry.stop()


def test_templates_lists_the_default_and_names_a_broken_file(certs: Path) -> None:
    listed = cli(certs, "templates")
    assert listed.returncode == 0, listed.stderr
    assert "fleet-default" in listed.stdout and "SerialNumber" in listed.stdout
    (certs / "templates" / "broken.json").write_text("{not json")
    line = assert_one_line_error(cli(certs, "templates"))
    assert "broken.json" in line


def test_operator_shadow_commands(certs: Path) -> None:
    with fleet_up(certs):
        desired = cli(
            certs, "shadow", "desire", "boiler-1", "target=21.5", 'mode="eco"', "sched.night=16"
        )
        assert desired.returncode == 0, desired.stderr
        assert "note: no thing boiler-1 in the registry" in desired.stderr  # a typo shows
        assert json.loads(desired.stdout)["state"]["desired"]["sched"] == {"night": 16}
        shown = cli(certs, "shadow", "get", "boiler-1")
        assert shown.returncode == 0, shown.stderr
        document = json.loads(shown.stdout)
        assert document["state"]["delta"] == {"target": 21.5, "mode": "eco", "sched": {"night": 16}}
        assert cli(certs, "shadow", "delete", "boiler-1").returncode == 0
        line = assert_one_line_error(cli(certs, "shadow", "get", "boiler-1"))
        assert "404" in line
        line = assert_one_line_error(cli(certs, "shadow", "desire", "boiler-1", "novalue"))
        assert "key=value" in line


def test_output_piped_into_a_closed_reader_is_no_traceback(certs: Path) -> None:
    result = run_into_a_closed_pipe(command(certs, "templates"))  # `fleet-broker ... | head`
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="Mosquitto drops to its own user only as root")
def test_a_folder_the_broker_user_cannot_enter_is_named_with_the_fix(workdir: Path) -> None:
    private = workdir / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)  # as mktemp -d makes it
    folder = private / "certs"
    init = cli(folder, "init")
    assert init.returncode == 0, init.stderr
    assert f"chmod o+x {private}" in init.stdout  # said at once, as a warning
    line = assert_one_line_error(cli(folder, "up", "--port", str(free_port())))
    assert f"{private} is mode 0700" in line and f"run: chmod o+x {private}" in line


def pasted_hints(text: str) -> list[list[str]]:
    """Every `fleet-broker ...` command line in ``text``, as a user would paste it (up to the
    end of the clause it stands in)."""
    hints = []
    for match in re.finditer(r"fleet-broker((?: (?:--?[\w-]+|[\w./<>@-]+))+)", text):
        words = match.group(1).split()
        if words and words[0] not in ("up", "down", "init") and words[0].startswith("<"):
            continue
        hints.append(words)
    return hints


def test_every_hint_fleet_broker_prints_runs_when_pasted(workdir: Path) -> None:
    from broker.cli import build_parser

    folder = workdir / "certs"
    outputs = [
        cli(folder, "init").stdout,
        cli(folder, "status").stdout,
        cli(folder, "down").stdout,
        cli(workdir / "nothing", "things").stderr,
        cli(workdir / "nothing", "templates").stderr,
        cli(workdir / "nothing", "up").stderr,
        cli(folder, "shadow", "get", "t").stderr,
        cli(folder, "revoke", "no-such-thing").stderr,
    ]
    hints = [hint for text in outputs for hint in pasted_hints(text)]
    assert any(hint[:1] == ["up"] and "--dir" in hint for hint in hints), outputs
    parser = build_parser()
    for hint in hints:
        if hint[0] in ("down", "up", "init", "things", "certs", "status") or "--dir" in hint:
            parser.parse_args(hint)  # SystemExit (a usage error) fails the test


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["up", "--port", "99999"], "--port 99999 is not a TCP port: give 1-65535"),
        (["up", "--bind", "999.1.1.1"], "bind_address 999.1.1.1 is not an address of this machine"),
        (["up", "--bind", "10.255.255.254"], "is not an address of this machine"),
    ],
)
def test_a_bad_port_or_address_is_named_for_what_it_is(
    certs: Path, args: list[str], expected: str
) -> None:
    assert expected in assert_one_line_error(cli(certs, *args))


def test_an_unusable_run_dir_is_one_line_naming_the_key(certs: Path) -> None:
    (certs / "broker.toml").write_text('[broker]\nrun_dir = "/proc/fleet-run"\n')
    line = assert_one_line_error(cli(certs, "up", "--port", str(free_port())))
    assert "broker.run_dir /proc/fleet-run cannot be made" in line


def test_listings_for_scripts_json_and_filters(certs: Path) -> None:
    assert cli(certs, "issue-claim", "json-batch", "--count", "2").returncode == 0
    claims = json.loads(cli(certs, "certs", "--json", "--role", "claim").stdout)
    assert {c["role"] for c in claims} == {"claim"} and len(claims) == 3  # + the shared one
    assert json.loads(cli(certs, "certs", "--json", "--status", "REVOKED").stdout) == []
    assert json.loads(cli(certs, "things", "--json").stdout) == []
    assert json.loads(cli(certs, "status", "--json").stdout) == {"running": False}


def test_revoking_twice_says_it_was_revoked_already(certs: Path) -> None:
    assert cli(certs, "issue-claim", "twice").returncode == 0
    claim = next(
        c["id"] for c in json.loads(cli(certs, "certs", "--json").stdout) if c["label"] == "twice"
    )
    first = cli(certs, "revoke", claim)
    assert first.returncode == 0 and f"revoked certificate {claim[:16]}" in first.stdout
    time.sleep(1.1)
    second = cli(certs, "revoke", claim)
    assert second.returncode == 0 and "was revoked already" in second.stdout, second.stdout
    assert len(second.stdout.splitlines()) == 2  # and one line about the broker, no paragraph


def test_every_tool_says_its_version() -> None:
    for module in ("broker.cli", "agent.cli"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, env=ENV
        )
        assert result.returncode == 0 and result.stdout.split()[1][0].isdigit(), result


def test_watch_prints_shadow_changes_as_they_happen_and_stops_on_sigterm(certs: Path) -> None:
    with fleet_up(certs):
        watcher = subprocess.Popen(
            command(certs, "watch", "kettle-1"),
            cwd=REPO,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stdout is not None
            assert "watching kettle-1" in watcher.stdout.readline()
            time.sleep(0.3)  # subscribed by now
            assert cli(certs, "shadow", "desire", "kettle-1", "temp=90").returncode == 0
            line = watcher.stdout.readline()
            assert "$aws/things/kettle-1/shadow/update/" in line and '"temp":90' in line, line
        finally:
            watcher.send_signal(signal.SIGTERM)
            _, err = watcher.communicate(timeout=10)
        assert watcher.returncode == 0, err


def test_status_follows_the_services_after_up_restarts_them(certs: Path) -> None:
    with fleet_up(certs):
        old = run_state(certs)["services_pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = run_state(certs)
            if state["services_pid"] != old and state.get("services_restarts") == 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("fleet-broker.json still names the dead services pid")
        status = cli(certs, "status")
        assert status.returncode == 0, status.stderr
        assert f"running (pid {state['services_pid']}, restarted 1 time(s))" in status.stdout
