"""Locust users per worker process: how many virtual devices one Locust worker holds.

Starts the local stack (Mosquitto + plugin + services, a throw-away PKI, a free port), then a
headless Locust master and ONE worker process running simulator/locustfile.py, ramps to N users
at R per second and holds them for H seconds, each device making a shadow request every I
seconds on average (update : get : desired change = 8 : 1 : 1, every desired change answered by
the device's echo report). Recorded per N:

- users connected: the worker's established connections to the broker, sampled twice a second;
  the ramp time is from the start of spawning until all N are connected;
- stalls: users that never finished onboarding (N minus `device/onboarding` successes),
  failures, and the shadow request rate achieved in the hold against the N / I expected;
- latency from Locust's statistics: whole run (ramp included) and the last 10 s window of the
  hold (Locust's "current" percentiles), worst hold window p99 too;
- the worker process: peak RSS, CPU seconds and share of one core in the ramp and the hold;
- the machine's load average (the broker, the services, the master and the worker share its
  cores, and other work may be running).

With ``--idle N`` it also measures the transport choice: N idle connections in one gevent
process, driven by simulator/locust_transport.py's reader greenlet versus paho's loop_start()
(a greenlet too under gevent, plus a socketpair and a select() every second per client).

Run:  .venv/bin/python bench/locust_users.py [--users 1000 1500 2000] [--spawn-rate 50]
          [--hold 60] [--interval 5] [--idle 1000]
Results are printed and appended as JSON to bench/results/locust_users.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench._record import record
from broker.mosquitto import free_port
from simulator.locust_command import LOCUSTFILE, PACKAGE_ROOT, locust_command
from tests.fleet import Fleet, running_fleet

SHADOW_TASKS = ("update", "get", "desired -> delta")


def device_options(fleet: Fleet, interval: float) -> list[str]:
    return [
        *("--host", f"mqtts://127.0.0.1:{fleet.config.port}"),
        *("--fleet-ca", str(fleet.pki.ca_cert)),
        *("--fleet-claim-cert", str(fleet.pki.claim_cert)),
        *("--fleet-claim-key", str(fleet.pki.claim_key)),
        *("--fleet-update-interval", str(interval)),
    ]


class Sampler:
    """The worker process, seen from outside."""

    def __init__(self, pid: int, broker_port: int) -> None:
        self.process = psutil.Process(pid)
        self.port = broker_port
        self.peak_rss = 0

    def connected(self) -> int:
        connections = self.process.net_connections(kind="tcp")
        return sum(
            1
            for c in connections
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == self.port
        )

    def cpu(self) -> float:
        times = self.process.cpu_times()
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        return times.user + times.system


def read_stats(prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {f"{r['Type']}/{r['Name']}".strip("/"): r for r in csv.DictReader(f)}


def read_history(prefix: Path, since: float) -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = {}
    with open(f"{prefix}_stats_history.csv", newline="") as f:
        for r in csv.DictReader(f):
            if float(r["Timestamp"]) >= since and r["50%"] != "N/A":
                rows.setdefault(f"{r['Type']}/{r['Name']}".strip("/"), []).append(r)
    return rows


def percentiles(row: dict[str, str]) -> dict[str, float]:
    return {f"p{p}_ms": float(row[f"{p}%"]) for p in (50, 90, 99)}


def run_once(
    fleet: Fleet, users: int, spawn_rate: float, hold: float, interval: float, folder: Path
) -> dict[str, Any]:
    prefix = folder / f"u{users}"
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    base = [*locust_command(), "-f", str(LOCUSTFILE)]
    log = (folder / f"u{users}.log").open("w")
    master = subprocess.Popen(
        [
            *base,
            *("--master", "--headless", "--expect-workers", "1", "--only-summary"),
            *("--master-bind-host", "127.0.0.1", "--master-bind-port", port),
            *("-u", str(users), "-r", str(spawn_rate), "--csv", str(prefix)),
            "--csv-full-history",
            *device_options(fleet, interval),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [*base, "--worker", "--master-host", "127.0.0.1", "--master-port", port],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sampler = Sampler(worker.pid, fleet.config.port)
    started = time.monotonic()
    cpu_start = sampler.cpu()
    deadline = started + users / spawn_rate + 120  # no ramp takes this long unless stalled
    connected = peak = 0
    while time.monotonic() < deadline and connected < users:
        time.sleep(0.5)
        connected = sampler.connected()
        peak = max(peak, connected)
    ramp_seconds = time.monotonic() - started
    ramp_cpu = sampler.cpu() - cpu_start
    ramp_done = connected >= users
    hold_from = time.time()
    hold_cpu_start, hold_started = sampler.cpu(), time.monotonic()
    lowest = connected
    while time.monotonic() - hold_started < hold:
        time.sleep(0.5)
        now = sampler.connected()
        lowest, peak = min(lowest, now), max(peak, now)
    hold_cpu = sampler.cpu() - hold_cpu_start
    hold_seconds = time.monotonic() - hold_started
    master.send_signal(signal.SIGTERM)  # Locust stops, writes its CSV, tells the worker to quit
    master.wait(60)
    worker.wait(60)
    log.close()

    stats = read_stats(prefix)
    history = read_history(prefix, hold_from + 10)  # windows wholly inside the hold
    onboarded = int(stats.get("device/onboarding", {}).get("Request Count", 0)) - int(
        stats.get("device/onboarding", {}).get("Failure Count", 0)
    )
    last = {name: rows[-1] for name, rows in history.items()}
    achieved = sum(
        float(last[f"shadow/{t}"]["Requests/s"]) for t in SHADOW_TASKS if f"shadow/{t}" in last
    )
    update_windows = history.get("shadow/update", [])
    return {
        "users": users,
        "spawn_rate": spawn_rate,
        "update_interval_s": interval,
        "hold_s": round(hold_seconds, 1),
        "connected_at_end_of_ramp": connected,
        "connected_lowest_in_hold": lowest,
        "connected_peak": peak,
        "ramp_complete": ramp_done,
        "ramp_s": round(ramp_seconds, 1),
        "never_onboarded": users - onboarded,
        "failures": int(stats["Aggregated"]["Failure Count"]),
        "requests": int(stats["Aggregated"]["Request Count"]),
        "shadow_requests_per_s": {
            "expected": round(users / interval, 1),
            "achieved": round(achieved, 1),
        },
        "update_whole_run": percentiles(stats["shadow/update"]),
        "update_last_10s_of_hold": percentiles(last["shadow/update"]) if update_windows else None,
        "update_worst_hold_window_p99_ms": max(
            (float(r["99%"]) for r in update_windows), default=None
        ),
        "onboarding_whole_run": percentiles(stats["device/onboarding"]),
        "connect_thing_whole_run": percentiles(stats["connect/thing"]),
        "worker": {
            "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
            "ramp_cpu_s": round(ramp_cpu, 1),
            "ramp_cpu_share": round(ramp_cpu / ramp_seconds, 2),
            "hold_cpu_share": round(hold_cpu / hold_seconds, 3),
        },
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------ transport idle cost


def idle_child(mode: str, clients: int, target: dict[str, Any]) -> None:
    """In a fresh process, as a Locust worker has it: gevent-patched standard library."""
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.session import tls_context
    from simulator.locust_transport import Connection

    context = tls_context(target["ca"], target["cert"], target["key"])
    held: list[Any] = []

    def connect(i: int) -> None:
        client_id = f"claim-idle-{mode}-{i}"
        if mode == "greenlet":
            held.append(
                Connection.open(
                    "127.0.0.1", target["port"], client_id=client_id, context=context, timeout=30
                )
            )
            return
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.tls_set_context(context)
        client.connect("127.0.0.1", target["port"], 120)
        client.loop_start()
        held.append(client)

    for first in range(0, clients, 50):
        gevent.joinall([gevent.spawn(connect, i) for i in range(first, min(clients, first + 50))])
    gevent.sleep(3)
    me = psutil.Process()
    before, began = me.cpu_times(), time.monotonic()
    gevent.sleep(20)
    after, seconds = me.cpu_times(), time.monotonic() - began
    cpu = (after.user + after.system - before.user - before.system) / seconds
    result = {
        "clients": len(held),
        "idle_cpu_share": round(cpu, 3),
        "rss_mb": round(me.memory_info().rss / 2**20, 1),
        "open_files": me.num_fds(),
    }
    print(json.dumps(result), flush=True)
    os._exit(0)  # no orderly goodbye for thousands of clients: not what is measured


def idle_compare(fleet: Fleet, clients: int) -> dict[str, Any]:
    target = {
        "port": fleet.config.port,
        "ca": str(fleet.pki.ca_cert),
        "cert": str(fleet.pki.claim_cert),
        "key": str(fleet.pki.claim_key),
    }
    results = {}
    for mode in ("greenlet", "loop_start"):
        out = subprocess.run(
            [sys.executable, __file__, "--idle-child", mode, str(clients), json.dumps(target)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 1500, 2000])
    parser.add_argument("--spawn-rate", type=float, default=50)
    parser.add_argument("--hold", type=float, default=60)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--idle", type=int, default=0, help="also compare N idle connections")
    parser.add_argument("--idle-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.idle_child:
        mode, clients, target = args.idle_child
        idle_child(mode, int(clients), json.loads(target))
        return
    folder = Path(tempfile.mkdtemp(prefix="locust-users-"))
    for users in args.users:
        with running_fleet(services=True) as fleet:  # a fresh registry per size
            result = run_once(fleet, users, args.spawn_rate, args.hold, args.interval, folder)
        record("locust_users", {"run": "users_per_worker", **result})
    if args.idle:
        with running_fleet(services=True) as fleet:
            transport = idle_compare(fleet, args.idle)
        record(
            "locust_users",
            {"run": "transport_idle", **transport, "loadavg_end": list(os.getloadavg())},
        )
    print(f"Locust CSV and logs in {folder}")


if __name__ == "__main__":
    main()
