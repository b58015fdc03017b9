"""`fleet-sim demo`, the README's main job, end to end: real Mosquitto with the plugin, the real
fleet services, a real `fleet-agent run` process and virtual devices on the agent code.

The report must say what happened (counts that add up, every check by name) and the demo must
leave no process behind, also when interrupted.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from simulator.demo import run_demo
from simulator.demo_report import print_report
from tests.fleet import REPO, make_workdir
from tests.test_agent_e2e import TOKEN_LIKE

pytestmark = pytest.mark.commands

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CHECKS = {
    "every device onboards through Fleet Provisioning",
    "devices report their shadow state",
    "desired state reaches the devices and comes back reported",
    "a certificate cannot take another device's client id",
    "subscribing to another thing's topics is refused",
    "changing another thing's shadow is refused",
    "a device cannot forge a service reply",
    "a claim certificate cannot use shadow topics",
    "a revoked device is disconnected at once",
    "a revoked certificate cannot connect again",
    "a revoked thing cannot be registered again with the claim",
    "a flooding device is throttled and the others are answered",
    "the fleet-agent process stops cleanly on SIGTERM",
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = make_workdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def processes_using(folder: Path) -> list[str]:
    """Command lines of live processes that name ``folder`` (broker, services, agent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(folder) in command and state != "Z":
            found.append(command)
    return found


def demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulator.cli", "demo", *args],
        cwd=REPO,
        env={**ENV, "COLUMNS": "200"},  # one table row per line, for the assertions
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_onboards_syncs_defends_and_reports(workdir: Path) -> None:
    devices = 7
    report = run_demo(devices, workdir, None, Console(file=io.StringIO()))

    failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.passed]
    assert report.passed, failed
    assert {c.name for c in report.checks} == CHECKS

    virtual = devices - 1
    assert report.onboarding["onboarded"] == devices
    assert report.onboarding["virtual_onboarded"] == virtual
    assert report.onboarding["agent_thing"] == "gateway-0000"
    assert 0 < report.onboarding["agent_provisioned_s"] <= report.onboarding["agent_reported_s"]
    steps = report.steps
    assert steps["create_certificate"]["count"] == virtual
    assert steps["register_thing"]["count"] == virtual
    assert steps["onboarding"]["count"] == virtual
    # Each virtual device: a claim connection and its own, each timed stage by stage.
    for stage in ("tcp_connect", "tls_handshake", "connack"):
        assert steps[stage]["count"] >= 2 * virtual
    assert steps["shadow_update"]["count"] == 2 * virtual
    desired = 1 + math.ceil(virtual / 4)  # the agent and every fourth virtual device
    assert report.shadow == {
        "desired_sent": desired,
        "desired_reported": desired,
        "revocation_ms": report.shadow["revocation_ms"],
    }
    assert steps["desired_to_reported"]["count"] == desired
    assert steps["delta_delivery"]["count"] == desired - 1  # timed on the virtual devices
    for s in steps.values():
        assert 0 <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert report.shadow["revocation_ms"] is not None
    assert report.errors == {}

    # Everything it started is stopped; the agent's key stayed private on its "device".
    assert processes_using(workdir) == []
    key = workdir / "fleet-agent" / "state" / "device.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    console = Console(file=io.StringIO(), record=True, width=200)
    print_report(report, console)
    text = console.export_text()
    assert "PASS: all 13 checks passed" in text
    assert f"{devices}/{devices} (1 fleet-agent process + {virtual} virtual devices" in text
    for label in ("CreateCertificateFromCsr", "RegisterThing", "desired -> reported", "p99"):
        assert label in text
    # The onboarding table is a list of figures: no header row, so no empty one.
    onboarding = text[text.index("Onboarding: ") : text.index("Every step, measured")]
    rows = [line for line in onboarding.splitlines() if line.startswith(("│", "┃"))]
    assert rows[0].startswith("│ devices onboarded"), onboarding
    assert all(line.strip("│┃ ") for line in rows), onboarding


def test_the_command_prints_the_report_and_no_secret(workdir: Path) -> None:
    result = demo("--devices", "3", "--dir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "PASS: all 13 checks passed" in out
    assert "3/3 (1 fleet-agent process + 2 virtual devices" in out
    assert "CONNACK 0x87" in out and "SUBACK 0x87" in out and "PUBACK 0x87" in out
    assert "disconnected" in out and "ms after revoke" in out
    assert "PRIVATE KEY" not in out and "BEGIN CERTIFICATE" not in out
    assert not TOKEN_LIKE.search(out.replace(str(workdir), "")), "a token-like string leaked"
    assert processes_using(workdir) == []


def test_a_closed_stdout_does_not_turn_a_pass_into_a_fail(workdir: Path) -> None:
    """`fleet-sim demo | head -3`: the demo goes on quietly, stops what it started, and its
    exit code is still its verdict (0: PASS)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "demo", "--devices", "3", "--dir", str(workdir)],
        cwd=REPO,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        first = [process.stdout.readline() for _ in range(3)]
        process.stdout.close()  # as head does once it has its lines
        assert process.wait(timeout=120) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # One line, not broken mid-URL at a pipe's 80 columns.
    assert first[0].startswith("mqtt-fleet demo in ") and "mqtts://127.0.0.1:" in first[0]
    assert "Traceback" not in process.stderr.read()
    assert processes_using(workdir) == []


def test_a_busy_port_is_one_line_and_nothing_is_started(workdir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = demo("--port", str(port), "--dir", str(workdir))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0], lines
    assert not (workdir / "certs").exists()


def test_ctrl_c_stops_everything_without_a_traceback(workdir: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "demo", "--devices", "150", "--dir", str(workdir)],
        cwd=REPO,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("onboarding"):
                break
        process.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the demo
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert processes_using(workdir) == []


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--pki", "/nonexistent"], "--pki applies only with --endpoint"),
        (["--agent-control", "/run/x.sock"], "--agent-control applies only with --endpoint"),
        (["--endpoint", "broker"], "--endpoint needs --pki"),
        (["--endpoint", "broker", "--pki", "/nonexistent"], "--pki /nonexistent: no such folder"),
        (["--devices", "1"], "--devices must be between 2 and 2000"),
    ],
)
def test_bad_demo_options_are_one_line(options: list[str], named: str) -> None:
    result = demo(*options)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines


def test_a_broker_side_folder_without_the_operator_files_is_one_line(workdir: Path) -> None:
    """--pki naming a device's files only (ca + claim) instead of the broker side's folder."""
    for name in ("ca.pem", "claim.pem", "claim.key"):
        (workdir / name).write_text("")
    result = demo("--endpoint", "localhost", "--pki", str(workdir))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "service.pem is missing" in lines[0], lines
    assert "fleet-broker init" in lines[0]
