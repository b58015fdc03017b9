"""`fleet-sim run` end to end: a small fleet against a local broker side it starts itself,
with shadow updates, operator desired changes and a reconnect storm; the report adds up."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.scenario import Scenario, ScenarioError, build
from tests.fleet import AGENT_ENV, REPO, make_workdir

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
    assert "register_thing" in proc.stdout and "p99" in proc.stdout


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


def test_the_broker_work_folder_is_private_and_removed() -> None:
    import os
    import stat

    from broker.mosquitto import broker_user
    from simulator.run import private_workdir

    with private_workdir() as folder:
        (folder / "ca.key").write_text("secret")
        info = folder.stat()
        assert info.st_uid == os.geteuid()
        # Ours only; as root, Mosquitto's dropped user may pass through but not list it.
        expected = 0o700 if broker_user() in (None, "root") else 0o710
        assert stat.S_IMODE(info.st_mode) == expected
    assert not folder.exists()


def test_bad_options_are_clear_errors() -> None:
    proc = fleet_sim("run", "--devices", "0", "--rate", "-1", timeout=60)
    assert proc.returncode == 2
    assert "devices must be between 1 and 200000" in proc.stderr
    assert "rate must be above 0" in proc.stderr
    assert "Traceback" not in proc.stderr


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


def test_arrivals_follow_the_rate_and_the_ramp() -> None:
    constant = Scenario(devices=100, rate=50)
    assert constant.arrival_offset(50) == pytest.approx(1.0)
    linear = Scenario(devices=100, rate=50, ramp="linear", ramp_seconds=2)
    # 50 devices arrive during the 2 s ramp (half the peak rate on average), then 50/s.
    assert linear.arrival_offset(50) == pytest.approx(2.0)
    assert linear.arrival_offset(12) > constant.arrival_offset(12)  # slower at first
    assert linear.arrival_offset(100) == pytest.approx(3.0)
