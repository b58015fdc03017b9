"""What an idle connected `fleet-agent run` costs, and how fast it is back after a broker restart.

Starts the whole local stack (Mosquitto with the plugin, the fleet services) on a free port with
a throw-away PKI, and the real agent as a subprocess (`fleet-agent run`, default settings:
report_interval 300 s, keepalive 60 s). Once it has provisioned and synced:

- ``idle``: samples the agent process over a window (default 60 s) in which nothing happens
  but MQTT keepalive pings: CPU time (utime+stime from /proc/<pid>/stat, in clock ticks, and
  the nanosecond on-CPU time of all its threads from /proc/<pid>/task/*/schedstat, since an
  idle minute is a few ticks at most), RSS (VmRSS) and PSS (smaps_rollup), threads, and
  wakeups (voluntary context switches of all threads). Expect about 5 wakeups a minute: paho's
  loop_misc, which the session runs every keepalive/4 (15 s), and the keepalive ping. The CPU
  figure of one minute varies a lot between minutes (seen: 9 to 75 ms), so compare several runs.
- ``restart``: stops the stack (services, then Mosquitto) and starts it again at once, N times
  (default 5), and times, from the moment Mosquitto listens again, until the agent is connected
  (subscribed) and until it has re-synced (a shadow get answered), using the agent's own
  timestamps from its control socket. Before each restart the connection has been up longer
  than ReconnectPolicy.stable_after (60 s), so the agent's backoff starts from its first step:
  a wait of up to 1 s (full jitter), doubling with each refused attempt while the broker is down.
  The outage (Mosquitto gone until listening again) is measured and reported.

Run:  .venv/bin/python bench/agent_idle.py [--mode idle|restart|both] [--seconds 60] [--restarts 5]
Results are printed and appended as JSON lines to bench/results/agent_idle.jsonl.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import control
from agent.reconnect import ReconnectPolicy
from bench._record import record
from tests.fleet import Fleet, agent_config, running_fleet, start_agent_daemon
from tests.test_agent_run import reported, thing_of, wait_until

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
KEEPALIVE_S = 60  # RuntimeSettings.keepalive; agent.toml does not change it here
SETTLE_S = ReconnectPolicy().stable_after + 5


# ------------------------------------------------------------------- /proc


def _kv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kb(value: str) -> int:
    return int(value.split()[0])


def sample(pid: int) -> dict[str, float]:
    """One reading of the process: CPU (ticks and ns), memory (kB), threads, context switches."""
    proc = Path(f"/proc/{pid}")
    stat = (proc / "stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields 3.. (the name may hold spaces)
    status = _kv(proc / "status")
    rollup = _kv(proc / "smaps_rollup")
    on_cpu_ns = voluntary = involuntary = 0
    for task in (proc / "task").iterdir():
        try:
            on_cpu_ns += int((task / "schedstat").read_text().split()[0])
            task_status = _kv(task / "status")
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        voluntary += int(task_status["voluntary_ctxt_switches"])
        involuntary += int(task_status["nonvoluntary_ctxt_switches"])
    return {
        "at": time.monotonic(),
        "ticks": int(fields[11]) + int(fields[12]),  # utime + stime (all threads, incl. ended)
        "on_cpu_ns": on_cpu_ns,
        "rss_kb": _kb(status["VmRSS"]),
        "hwm_kb": _kb(status["VmHWM"]),
        "pss_kb": _kb(rollup["Pss"]),
        "threads": int(status["Threads"]),
        "voluntary": voluntary,
        "involuntary": involuntary,
    }


def listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (state 0A in /proc/net/tcp{,6}): no probe
    connection, which the broker would log and the agent could race."""
    needle = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and local.endswith(needle):
                    return True
    return False


# ------------------------------------------------------------------- agent


def agent_status(state: Path) -> dict[str, Any]:
    return control.call(state / control.SOCKET_NAME, {"op": "status"}, timeout=10)["status"]


def settled(state: Path) -> dict[str, Any] | None:
    """The status once connected with every shadow synced and nothing queued, else None."""
    try:
        status = agent_status(state)
    except control.ControlError:
        return None
    shadows = status["shadows"].values()
    if status["state"] != "connected" or not all(s["last_sync"] for s in shadows):
        return None
    if any(s["queued_reports"] for s in shadows):
        return None
    return status


def start(fleet: Fleet) -> tuple[subprocess.Popen[str], Path, str]:
    config = agent_config(fleet, "SN-BENCH-IDLE")  # defaults: report_interval 300 s
    state = config.parent / "state"
    daemon = start_agent_daemon(config)
    thing = thing_of(config)  # state/provisioning.json written
    wait_until(lambda: reported(fleet, thing).get("device"), timeout=60, what="device facts")
    wait_until(lambda: settled(state), timeout=60, what="synced, nothing queued")
    return daemon, state, thing


def stop(daemon: subprocess.Popen[str]) -> str:
    daemon.send_signal(signal.SIGTERM)
    try:
        _, err = daemon.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        _, err = daemon.communicate()
    return err


# -------------------------------------------------------------------- idle


def measure_idle(daemon: subprocess.Popen[str], state: Path, seconds: float) -> dict[str, Any]:
    before = agent_status(state)
    time.sleep(2)  # let the status request itself pass
    first = sample(daemon.pid)
    samples = [first]
    deadline = first["at"] + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(5.0, left))
        samples.append(sample(daemon.pid))
    last = samples[-1]
    after = agent_status(state)
    window = last["at"] - first["at"]
    per_minute = 60 / window
    cpu_ms = (last["ticks"] - first["ticks"]) * 1000 / CLOCK_TICK
    cpu_ms_ns = (last["on_cpu_ns"] - first["on_cpu_ns"]) / 1e6
    return {
        "mode": "idle",
        "window_s": round(window, 1),
        "keepalive_s": KEEPALIVE_S,
        "report_interval_s": 300,
        "cpu_percent_one_core": round(100 * cpu_ms_ns / 1000 / window, 4),
        "cpu_ms_per_min": round(cpu_ms_ns * per_minute, 2),
        "cpu_ticks": last["ticks"] - first["ticks"],
        "cpu_ms_per_min_from_ticks": round(cpu_ms * per_minute, 1),
        "clock_tick_ms": round(1000 / CLOCK_TICK, 1),
        "cpu_s_to_first_sync": round(first["ticks"] / CLOCK_TICK, 2),
        "rss_mb": round(last["rss_kb"] / 1024, 1),
        "rss_max_mb": round(max(s["rss_kb"] for s in samples) / 1024, 1),
        "rss_peak_since_start_mb": round(last["hwm_kb"] / 1024, 1),
        "pss_mb": round(last["pss_kb"] / 1024, 1),
        "threads": last["threads"],
        "wakeups_per_min": round((last["voluntary"] - first["voluntary"]) * per_minute, 1),
        "involuntary_switches": last["involuntary"] - first["involuntary"],
        "reconnects_in_window": after["connections"] - before["connections"],
    }


# ----------------------------------------------------------------- restart


class ListenWatch(threading.Thread):
    """Notes when ``port`` starts listening (wall clock and monotonic), polling every 2 ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.wall: float | None = None
        self.mono: float | None = None
        self._cancelled = threading.Event()

    def run(self) -> None:
        while not self._cancelled.is_set():
            if listening(self.port):
                self.mono, self.wall = time.monotonic(), time.time()
                return
            time.sleep(0.002)

    def cancel(self) -> None:
        self._cancelled.set()


def wait_stable(state: Path, settle: float) -> dict[str, Any]:
    """The status once the connection has been up ``settle`` seconds (sleeping, not polling)."""
    while True:
        status = wait_until(lambda: settled(state), timeout=120, what="connected and synced")
        left = settle - (time.time() - status["connected_since"])
        if left <= 0:
            return status
        time.sleep(left)


def one_restart(fleet: Fleet, state: Path, thing: str, settle: float) -> dict[str, Any]:
    before = wait_stable(state, settle)
    log = fleet.config.run_dir / "mosquitto.log"
    seen = log.read_text(errors="replace").count(f" as {thing}")
    fleet.stack.stop()
    down = time.monotonic()
    assert not listening(fleet.config.port)
    watch = ListenWatch(fleet.config.port)
    watch.start()
    fleet.stack.start()  # returns once the services are ready too
    services_ready = time.monotonic()
    watch.join(5)
    watch.cancel()
    assert watch.mono is not None and watch.wall is not None

    def caught_up() -> dict[str, Any] | None:
        status = settled(state)
        if status is None or status["connections"] <= before["connections"]:
            return None
        if all(s["last_sync"] > watch.wall for s in status["shadows"].values()):
            return status
        return None

    status = wait_until(caught_up, timeout=300, what="reconnected and re-synced")
    synced = max(s["last_sync"] for s in status["shadows"].values())
    lines = log.read_text(errors="replace").count(f" as {thing}")
    return {
        "outage_s": round(watch.mono - down, 3),
        "services_ready_after_listen_s": round(services_ready - watch.mono, 3),
        "connected_s": round(status["connected_since"] - watch.wall, 3),
        "synced_s": round(synced - watch.wall, 3),
        "connections": status["connections"] - before["connections"],
        "broker_logged_connect": lines > seen,  # "New client connected ... as <thing>"
    }


def measure_restarts(fleet: Fleet, state: Path, thing: str, count: int, settle: float) -> dict:
    runs = []
    for i in range(count):
        run = one_restart(fleet, state, thing, settle)
        print(f"restart {i + 1}/{count}: {run}", flush=True)
        runs.append(run)
    connected = [r["connected_s"] for r in runs]
    synced = [r["synced_s"] for r in runs]
    return {
        "mode": "restart",
        "restarts": count,
        "link_up_before_restart_s": settle,
        "outage_median_s": round(statistics.median(r["outage_s"] for r in runs), 3),
        "outage_max_s": max(r["outage_s"] for r in runs),
        "connected_median_s": round(statistics.median(connected), 3),
        "connected_max_s": max(connected),
        "synced_median_s": round(statistics.median(synced), 3),
        "synced_max_s": max(synced),
        "services_ready_after_listen_median_s": round(
            statistics.median(r["services_ready_after_listen_s"] for r in runs), 3
        ),
        "extra_connections": sum(r["connections"] - 1 for r in runs),
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("idle", "restart", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window (default 60)")
    parser.add_argument("--restarts", type=int, default=5, help="broker restarts (default 5)")
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_S,
        help=f"seconds connected before each restart (default {SETTLE_S:g}: past the "
        "backoff's stable_after, so every restart starts from the first backoff step)",
    )
    args = parser.parse_args()
    with running_fleet(services=True) as fleet:
        daemon, state, thing = start(fleet)
        try:
            if args.mode in ("idle", "both"):
                record("agent_idle", measure_idle(daemon, state, args.seconds))
            if args.mode in ("restart", "both"):
                record(
                    "agent_idle",
                    measure_restarts(fleet, state, thing, args.restarts, args.settle),
                )
        finally:
            err = stop(daemon)
    if daemon.returncode != 0 or "Traceback" in err:
        print(f"the agent exited with {daemon.returncode}:\n{err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
