"""Issue 6's scale targets, each from a real `fleet-sim run` of 10,000 devices on this machine
(broker, services and simulator sharing its cores):

  onboarding  10,000 devices arrive faster than they can be onboarded (so the rate measured is
              the capacity), one shared claim certificate, two simulator processes of 5,000;
              the bare mutual-TLS connect ceiling is measured first in the same run; after
              onboarding every device drops at once and reconnects (the storm).
              Targets: 10,000 onboarded, zero errors; onboarding >= 150/s sustained, shown as
              a share of the ceiling; storm >= 400 reconnects/s; <= 60 KB per device held;
              >= 5,000 devices per process.
  held        10,000 devices held connected, each updating its shadow every 30 s, for a
              steady hold after onboarding. Target: update round trip p99 < 100 ms (over the
              hold only: during onboarding the cores are saturated by design).

Each run's full report (report.json, table, PNG plots) stays in the printed folder.

Run:  .venv/bin/python bench/fleet_10k.py [--devices 10000] [--only onboarding|held]
Results are printed and appended as JSON to bench/results/fleet_10k.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import record

ROOT = Path(__file__).resolve().parent.parent

RUNS: dict[str, list[str]] = {
    "onboarding": [
        *("--rate", "300", "--concurrency", "400", "--processes", "2"),
        *("--update-interval", "0", "--hold", "40", "--storm-at", "10"),
        *("--ceiling-seconds", "5"),
    ],
    "held": [
        *("--rate", "200", "--concurrency", "400", "--processes", "2"),
        *("--update-interval", "30", "--hold", "120"),
    ],
}


def fleet_sim(devices: int, options: list[str], out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "simulator.cli", "run", "--devices", str(devices)]
    command += [*options, "--out", str(out)]
    print("$", " ".join(command[1:]), flush=True)
    env = {**os.environ, "COLUMNS": "110", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    table = proc.stdout[proc.stdout.find(f"/{devices} devices onboarded") - 6 :]
    print(table, proc.stderr[-2000:], flush=True)
    report = json.loads((out / "report.json").read_text())
    report["exit_code"] = proc.returncode
    return report


def onboarding_figures(report: dict[str, Any]) -> dict[str, Any]:
    steps, storm = report["steps"], report["steps_storm"].get("reconnect", {})
    simulator, ceiling = report["simulator"], report["ceiling"]
    onboarding = steps["onboarding"]
    return {
        "onboarded": report["devices"]["onboarded"],
        "errors": report["errors_total"],
        "error_kinds": report["errors"],
        "onboarding_per_s": onboarding["rate_per_s"],
        "onboarding_p50_ms": onboarding["p50_ms"],
        "onboarding_p99_ms": onboarding["p99_ms"],
        "create_certificate_p50_ms": steps["create_certificate"]["p50_ms"],
        "register_thing_p50_ms": steps["register_thing"]["p50_ms"],
        "tls_handshake_p50_ms": steps["tls_handshake"]["p50_ms"],
        "ceiling_connects_per_s": ceiling["connects_per_s"],
        "onboarding_share_of_ceiling": ceiling["onboarding_share"],
        "connections_share_of_ceiling": ceiling["connections_share"],
        "storm_reconnects": storm.get("count"),
        "storm_reconnects_per_s": storm.get("rate_per_s"),
        "storm_reconnect_p99_ms": storm.get("p99_ms"),
        "kb_per_device_held": simulator["kb_per_device_held"],
        "kb_per_device_peak": simulator["kb_per_connected_device"],
        "devices_per_process": simulator["devices_per_process"],
        "simulator_cpu_s": simulator["cpu_s"],
        "services_max_depths": report["services"],
        "targets": {
            "all_onboarded_zero_errors": report["devices"]["onboarded"]
            == report["devices"]["target"]
            and report["errors_total"] == 0,
            "onboarding_150_per_s": onboarding["rate_per_s"] >= 150,
            "storm_400_per_s": (storm.get("rate_per_s") or 0) >= 400,
            "memory_60_kb": (simulator["kb_per_device_held"] or 1e9) <= 60,
            "5000_per_process": simulator["devices_per_process"] >= 5000,
        },
    }


def held_figures(report: dict[str, Any]) -> dict[str, Any]:
    update = report["steps_holding"].get("shadow_update", {})
    return {
        "onboarded": report["devices"]["onboarded"],
        "errors": report["errors_total"],
        "error_kinds": report["errors"],
        "peak_connected": report["devices"]["peak_connected"],
        "hold_updates": update.get("count"),
        "hold_updates_per_s": update.get("rate_per_s"),
        "hold_update_p50_ms": update.get("p50_ms"),
        "hold_update_p90_ms": update.get("p90_ms"),
        "hold_update_p99_ms": update.get("p99_ms"),
        "hold_update_max_ms": update.get("max_ms"),
        "whole_run_update_p99_ms": report["steps"].get("shadow_update", {}).get("p99_ms"),
        "kb_per_device_held": report["simulator"]["kb_per_device_held"],
        "targets": {"update_p99_under_100_ms": (update.get("p99_ms") or 1e9) < 100},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--only", choices=sorted(RUNS))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fleet-10k-", dir="/tmp"))
    folder.chmod(0o755)  # the broker's user reaches its PKI inside
    for name, options in RUNS.items():
        if args.only and name != args.only:
            continue
        report = fleet_sim(args.devices, options, folder / name)
        figures = onboarding_figures(report) if name == "onboarding" else held_figures(report)
        record(
            "fleet_10k",
            {
                "run": name,
                "devices": args.devices,
                "options": options,
                "exit_code": report["exit_code"],
                "load_average_1min_after": os.getloadavg()[0],
                "report": str(folder / name / "report.json"),
                **figures,
            },
        )


if __name__ == "__main__":
    main()
