"""`fleet-sim run` end to end: a small fleet against a local broker side it starts itself,
with shadow updates, operator desired changes and a reconnect storm; the report adds up."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from agent import distribution_version
from broker import bootstrap
from broker.mosquitto import free_port
from broker.mqtt import ConnectError
from simulator import progress
from simulator.cli import run_exit_code, setup_error_exit
from simulator.metrics import step_label
from simulator.scenario import Scenario, ScenarioError, build
from tests.fleet import AGENT_ENV, REPO, make_workdir

pytestmark = pytest.mark.commands

DEVICES = 24


def fleet_sim(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulator.cli", *args],
        cwd=REPO,
        env={**AGENT_ENV, "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fleet_sim_process(*args: str) -> subprocess.Popen[str]:
    """``fleet-sim`` with its stdout on a pipe we read (and may close) ourselves."""
    return subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", *args],
        cwd=REPO,
        env=AGENT_ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def folder() -> Iterator[Path]:
    path = make_workdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


#: A small, quick run: three devices, no hold.
QUICK = ("--devices", "3", "--rate", "20", "--processes", "1", "--hold", "0")


@pytest.fixture(scope="module")
def run() -> tuple[subprocess.CompletedProcess[str], Path]:
    out = make_workdir() / "report"
    scenario = out.parent / "scenario.toml"
    scenario.write_text(
        f"[scenario]\ndevices = {DEVICES}\nrate = 40\nprocesses = 2\nhold = 4\n"
        "update_interval = 1\ndesired_rate = 5\nstorm_at = 2\nceiling_seconds = 1\n"
    )
    proc = fleet_sim("run", str(scenario), "--out", str(out))
    return proc, out


def test_every_device_onboards_and_the_report_adds_up(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    devices = report["devices"]
    assert devices == {
        "target": DEVICES,
        "onboarded": DEVICES,
        "failed": 0,
        "peak_connected": DEVICES,
    }
    assert report["errors_total"] == 0, report["errors"]
    steps = report["steps"]
    # One claim flow per device, one storm reconnect per device.
    for step in ("create_certificate", "register_thing", "onboarding", "reconnect"):
        assert steps[step]["count"] == DEVICES, step
    # Claim connect + own connect + storm reconnect: three handshakes per device.
    for step in ("tcp_connect", "tls_handshake", "connack"):
        assert steps[step]["count"] == 3 * DEVICES, step
    assert steps["shadow_update"]["count"] >= DEVICES
    assert steps["delta_delivery"]["count"] >= 1
    assert report["desired_changes_sent"] >= steps["delta_delivery"]["count"] // 2
    for summary in steps.values():
        assert summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert report["broker"]["broker_clients_connected"] >= 1
    assert report["processes"] == 2
    # The storm's reconnects are its phase's; the steady hold is before it.
    assert report["steps_storm"]["reconnect"]["count"] == DEVICES
    assert "reconnect" not in report["steps_holding"]
    simulator = report["simulator"]
    assert simulator["kb_per_device_held"] > 0
    assert simulator["devices_per_process"] == DEVICES // 2


def test_the_ceiling_is_measured_first(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    report = json.loads((out / "report.json").read_text())
    ceiling = report["ceiling"]
    assert ceiling["connects"] >= 2 and ceiling["connects_per_s"] > 0
    assert ceiling["onboarding_per_s"] == report["steps"]["onboarding"]["rate_per_s"]
    assert ceiling["onboarding_share"] == pytest.approx(
        ceiling["onboarding_per_s"] / ceiling["connects_per_s"], abs=0.001
    )
    assert report["steps"]["ceiling_connect"]["count"] == ceiling["connects"]
    assert "bare mutual-TLS connects/s" in proc.stdout


def test_the_services_queue_depths_are_reported(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, out = run
    report = json.loads((out / "report.json").read_text())
    depths = report["services"]
    for name in ("requests_waiting", "provisioning_in_pool", "replies_queued"):
        assert isinstance(depths[name], int | float) and depths[name] >= 0, name


def test_plots_and_table_are_written(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    for name in ("rates.png", "latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert f"{DEVICES}/{DEVICES} devices onboarded" in proc.stdout
    # The table names steps as the README does; report.json keeps the keys.
    assert "RegisterThing" in proc.stdout and "p99" in proc.stdout
    assert "register_thing" not in proc.stdout


def test_the_report_describes_itself(run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = run
    report = json.loads((out / "report.json").read_text())
    assert report["fleet_sim_version"] == distribution_version()
    started = datetime.fromisoformat(report["started_at"].replace("Z", "+00:00"))
    assert started.utcoffset() == timedelta(0)
    assert abs(started.timestamp() + report["duration_s"] - time.time()) < 600
    # The broker really used: the local side's free port, not the scenario default 8883.
    port = int(re.search(r"local broker side on 127\.0\.0\.1:(\d+)", proc.stdout).group(1))
    assert report["endpoint"] == {"host": "localhost", "port": port, "local": True}
    assert report["scenario"]["port"] == port
    for figure in (
        "simulator.kb_per_connected_device",
        "simulator.kb_per_device_held",
        "broker.broker_stored_messages",
    ):
        assert "KB" in report["notes"][figure] or "store" in report["notes"][figure], figure
    for phase in ("steps", "steps_holding", "steps_storm"):
        for step, figures in report[phase].items():
            assert figures["label"] == step_label(step), (phase, step)
    assert report["steps"]["tls_handshake"]["label"] == "mutual-TLS handshake"


def test_progress_is_plain_lines_when_not_a_terminal(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = run
    lines = proc.stdout.splitlines()
    pattern = re.compile(
        rf"^ *\d+\.\ds (\w+): onboarded \d+/{DEVICES}, connected \d+, failed \d+, "
        r"errors \d+, arrivals [\d.]+/s"
    )
    phases = [m.group(1) for m in map(pattern.match, lines) if m]
    # Every phase in order, each on its own line; then the summary starts a line of its own.
    # ("starting" also fills the half second between the ceiling and the first arrival.)
    assert [p for i, p in enumerate(phases) if p not in phases[:i] and p != "starting"] == [
        "ceiling",
        "onboarding",
        "holding",
        "storm",
        "stopping",
    ], phases
    assert any("eta " in line for line in lines if pattern.match(line))
    summary = next(i for i, line in enumerate(lines) if "devices onboarded" in line)
    assert lines[summary].startswith(f"{DEVICES}/{DEVICES} devices onboarded")
    assert pattern.match(lines[summary - 1]) and "stopping" in lines[summary - 1]
    assert "fleet-sim run: " not in proc.stdout  # no live table frame in a log


def test_no_key_and_no_registry_in_the_output_folder(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = run
    files = [path for path in out.rglob("*") if path.is_file()]
    assert out / "report.json" in files
    for path in files:
        assert b"PRIVATE KEY" not in path.read_bytes(), path
        assert path.suffix not in (".db", ".key") and "registry" not in path.name, path
    assert not (out / "broker").exists()
    # The broker's logs are kept for debugging; its private work folder is gone.
    assert (out / "broker-logs" / "mosquitto.log").is_file()
    found = re.search(r"throw-away PKI in (\S+),", proc.stdout)
    assert found, proc.stdout
    assert not Path(found.group(1)).exists()


def test_the_broker_work_folder_is_private() -> None:
    """broker.local's folder, where fleet-sim run and locust --local keep the CA key. That it
    is removed at the end: tests/test_signals.py, test_sigterm_stops_a_run_which_still_...."""
    import os
    import shutil
    import stat

    from broker.local import private_folder
    from broker.mosquitto import broker_user

    folder = private_folder("fleet-test-")
    try:
        info = folder.stat()
        assert info.st_uid == os.geteuid()
        # Ours only; as root, Mosquitto's dropped user may pass through but not list it.
        expected = 0o700 if broker_user() in (None, "root") else 0o710
        assert stat.S_IMODE(info.st_mode) == expected
    finally:
        shutil.rmtree(folder)


def test_a_closed_stdout_is_no_failure(folder: Path) -> None:
    """`fleet-sim run | head -1`: the run goes on quietly, writes its report, exits 0."""
    process = fleet_sim_process("run", *QUICK, "--out", str(folder / "report"))
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().startswith("starting the local broker side")
    process.stdout.close()  # as head does once it has its lines
    try:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in process.stderr.read()
    report = json.loads((folder / "report" / "report.json").read_text())
    assert report["devices"]["onboarded"] == 3


def test_ctrl_c_exits_130_and_still_writes_the_report(folder: Path) -> None:
    out = folder / "report"
    process = fleet_sim_process(
        "run", "--devices", "3", "--processes", "1", "--hold", "60", "--out", str(out)
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        for line in process.stdout:
            if " holding: " in line:
                break
        process.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "(interrupted)" in stdout
    assert json.loads((out / "report.json").read_text())["interrupted"] is True


def test_an_unreachable_broker_exits_3(folder: Path) -> None:
    pki = bootstrap.initialize(folder / "certs")
    proc = fleet_sim(
        "run",
        *("--devices", "1", "--processes", "1", "--hold", "0", "--timeout", "2"),
        *("--endpoint", "127.0.0.1", "--port", str(free_port())),  # nobody listens there
        *("--ca-file", str(pki.ca_cert), "--claim-certificate", str(pki.claim_cert)),
        *("--claim-key", str(pki.claim_key), "--out", str(folder / "report")),
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    report = json.loads((folder / "report" / "report.json").read_text())
    assert report["endpoint"]["local"] is False
    assert set(report["errors"]["connect"]) == {"unreachable"}


def _report(onboarded: int, errors: dict[str, dict[str, int]], interrupted: bool = False) -> dict:
    return {"interrupted": interrupted, "devices": {"onboarded": onboarded}, "errors": errors}


@pytest.mark.unit
def test_the_exit_code_scheme() -> None:
    assert run_exit_code(_report(5, {}), 5) == 0
    assert run_exit_code(_report(4, {"register_thing": {"409": 1}}), 5) == 1
    assert run_exit_code(_report(0, {"connect": {"unreachable": 9}}), 5) == 3
    # Reached but refused is no reason to try again.
    assert run_exit_code(_report(0, {"connect": {"TLS refused": 9}}), 5) == 1
    assert run_exit_code(_report(5, {}, interrupted=True), 5) == 130

    def raised(error: BaseException) -> ConnectError:
        try:
            try:
                raise error
            except OSError:
                raise ConnectError("cannot connect to broker:8883") from None
        except ConnectError as exc:
            return exc

    assert setup_error_exit(raised(ConnectionRefusedError(111, "refused"))) == 3
    assert setup_error_exit(raised(ssl.SSLError("certificate verify failed"))) == 1
    assert setup_error_exit(ConnectError("broker:8883 refused the connection: Not authorized")) == 1
    assert setup_error_exit(ConnectError("no CONNACK from broker:8883 within 10 s")) == 3


def option_help(text: str, option: str) -> str:
    """An option's help in argparse's output, from its line to the next option's, unwrapped."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {option}"))
    end = next(
        (i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines)
    )
    return " ".join(" ".join(lines[start:end]).split())


def test_version_and_help() -> None:
    version = fleet_sim("--version", timeout=60)
    assert version.returncode == 0
    assert version.stdout.strip() == f"fleet-sim {distribution_version()}"
    top = " ".join(fleet_sim("--help", timeout=60).stdout.split())
    assert "``" not in top and "grows here" not in top  # a description, not a docstring
    for text in ("examples:", "fleet-sim demo", "exit codes: 0 done", "130 Ctrl-C", "143 SIGTERM"):
        assert text in top, text
    run_help = fleet_sim("run", "--help", timeout=60).stdout
    for option, default in (
        ("--ramp", "default constant"),
        ("--concurrency N", "default 1000"),
        ("--update-interval SECONDS", "default 30"),
        ("--hold SECONDS", "default 10"),
        ("--update-bytes BYTES", "default 64"),
        ("--ca-file FILE", "CA certificate"),
        ("--claim-certificate FILE", "claim certificate"),
        ("--claim-key FILE", "private key"),
    ):
        assert default in option_help(run_help, option), option
    demo_help = " ".join(fleet_sim("demo", "--help", timeout=60).stdout.split())
    assert "2 to 2000" in demo_help and "PASS" in demo_help


def test_bad_options_are_clear_errors() -> None:
    proc = fleet_sim("run", "--devices", "0", "--rate", "-1", timeout=60)
    assert proc.returncode == 2
    assert "devices must be between 1 and 200000" in proc.stderr
    assert "rate must be above 0" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.unit
def test_scenario_files_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('devices = "many"\nspeed = 3\nstorm_at = 50\nhold = 10\n')
    with pytest.raises(ScenarioError) as raised:
        build(path, {})
    text = "\n".join(raised.value.problems)
    assert "unknown key 'speed'" in text
    assert "devices: 'many' is not a valid int" in text
    assert "storm_at must lie within the hold" in text
    with pytest.raises(ScenarioError, match="no such scenario file"):
        build(tmp_path / "absent.toml", {})


@pytest.mark.unit
def test_arrivals_follow_the_rate_and_the_ramp() -> None:
    constant = Scenario(devices=100, rate=50)
    assert constant.arrival_offset(50) == pytest.approx(1.0)
    linear = Scenario(devices=100, rate=50, ramp="linear", ramp_seconds=2)
    # 50 devices arrive during the 2 s ramp (half the peak rate on average), then 50/s.
    assert linear.arrival_offset(50) == pytest.approx(2.0)
    assert linear.arrival_offset(12) > constant.arrival_offset(12)  # slower at first
    assert linear.arrival_offset(100) == pytest.approx(3.0)


@pytest.mark.unit
def test_the_progress_clock() -> None:
    scenario = Scenario(devices=100, rate=10, hold=5)
    clock = progress.Progress(scenario, started=100.0, ceiling=(98.0, 99.5), began=90.0)
    assert clock.phase(97.0, holding=False, storm=False) == "starting"
    assert clock.phase(98.5, holding=False, storm=False) == "ceiling"
    assert clock.phase(99.7, holding=False, storm=False) == "starting"
    assert clock.phase(101.0, holding=False, storm=False) == "onboarding"
    assert clock.phase(120.0, holding=True, storm=False) == "holding"
    assert clock.phase(121.0, holding=True, storm=True) == "storm"
    # On schedule: the last device is due 9.9 s after the start, then the 5 s hold.
    eta = progress.eta_seconds
    assert eta(scenario, now=100.0, started=100.0, hold_started=None, arrived=0, rate=0) == (
        pytest.approx(14.9)
    )
    # Slower than the schedule: the measured rate wins.
    assert eta(scenario, now=105.0, started=100.0, hold_started=None, arrived=20, rate=4) == 25.0
    assert eta(scenario, now=112.0, started=100.0, hold_started=110.0, arrived=100, rate=0) == 3.0
    meter = progress.ArrivalMeter(window=5.0)
    assert meter.rate(0.0, 0) == 0.0
    assert meter.rate(2.0, 10) == 5.0
    assert meter.rate(10.0, 50) == pytest.approx(5.0)  # over the last 5 s or so


@pytest.mark.unit
def test_plain_progress_lines_are_few_and_whole() -> None:
    out = io.StringIO()
    console = Console(file=out, width=40)  # narrower than a line: it must not wrap
    screen = progress.LineDisplay(console, every=3600)
    clock = progress.Progress(Scenario(devices=10), started=time.time())
    made = []

    def make(age: float) -> progress.Snapshot:
        made.append(age)
        return clock.snapshot(
            "onboarding", onboarded=4, failed=1, connected=4, errors=2, steps={}, hold_started=None
        )

    for phase in ("onboarding", "onboarding", "onboarding", "storm", "storm"):
        screen.update(phase, make)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # one per phase, the interval not yet over
    assert made == [0.0, 0.0]  # fresh figures, and only when a line is printed
    assert "onboarded 4/10, connected 4, failed 1, errors 2" in lines[0]
