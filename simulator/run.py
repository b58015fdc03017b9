"""``fleet-sim run``: a virtual fleet against the broker side, measured, with a report.

The parent process starts the local broker side when no endpoint is given, starts the worker
processes (simulator/worker.py), plays the operator (desired-state changes, reading the
broker's ``$SYS`` figures) and the clock (hold, reconnect storm, stop), merges what the
workers measure, shows it live, and at the end writes ``report.json``, ``rates.png`` and
``latency.png`` to the output folder and prints a table. Ctrl-C, or SIGTERM (``kill``,
``timeout``, a CI cancel), stops the fleet gracefully and still writes the report; the worker
processes die with this one even if it is killed.

The local broker side's work folder (its throw-away PKI with the CA and claim keys, the
registry, the broker's run folder) is a private temporary folder, never the output folder,
and is removed when the run ends; only the broker's and the services' logs are copied into
the output folder (``broker-logs/``), for debugging.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from rich.console import Console
from rich.table import Table

from agent import distribution_version, wire
from broker import bootstrap
from broker.local import HOST, LocalBrokerSide, local_broker_side
from broker.mosquitto import RunFiles
from broker.mqtt import connect as service_connect
from broker.mqtt import disconnect as service_disconnect
from broker.mqtt import tls_context as service_tls
from broker.pki import PkiPaths
from simulator import progress
from simulator.ceiling import STEP as CEILING_STEP
from simulator.metrics import Recorder, in_step_order, step_label
from simulator.plots import write_plots
from simulator.scenario import Scenario
from simulator.virtual_device import SENT_AT_KEY, Target
from simulator.worker import WorkerMessage, WorkerPlan, worker_main

SYS_TOPICS = {
    "$SYS/broker/clients/connected": "broker_clients_connected",
    "$SYS/broker/load/messages/received/1min": "broker_msgs_received_per_min",
    "$SYS/broker/load/messages/sent/1min": "broker_msgs_sent_per_min",
    "$SYS/broker/store/messages/count": "broker_stored_messages",
}
#: Cumulative $SYS counters, plotted as per-second rates (the 1min figures above lag).
SYS_COUNTERS = {
    "$SYS/broker/messages/received": "broker_msgs_received_per_s",
    "$SYS/broker/messages/sent": "broker_msgs_sent_per_s",
}
#: Queue depths the services publish (broker.services.FleetServices.stats).
SERVICE_DEPTHS = (
    "requests_waiting",
    "provisioning_in_pool",
    "replies_queued",
    "replies_in_flight",
)


@dataclass
class FleetState:
    """What the parent knows, merged from the workers."""

    recorder: Recorder
    connected: dict[int, int] = field(default_factory=dict)
    onboarded: dict[int, int] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)
    rss_kb: dict[int, int] = field(default_factory=dict)  # peak
    rss_now_kb: dict[int, int] = field(default_factory=dict)
    rss_at_peak_kb: int = 0  # all workers' RSS when the most devices were connected
    baseline_rss_kb: dict[int, int] = field(default_factory=dict)
    ceiling_connects: dict[int, int] = field(default_factory=dict)
    services: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)
    things: list[str] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)
    fatal: dict[int, str] = field(default_factory=dict)
    broker: dict[str, float] = field(default_factory=dict)
    peak_connected: int = 0
    hold_started: float | None = None  # wall clock: every device arrived and onboarded (or not)
    storm_started: float | None = None
    _summary: dict[str, Any] = field(default_factory=dict)
    _summary_at: float = 0.0

    def live_summary(self, max_age: float = progress.LIVE_SUMMARY_AGE) -> dict[str, Any]:
        """What the progress display shows, of its steps only and at most ``max_age`` seconds
        old: it sorts their samples, and this process shares the cores with the fleet it
        measures."""
        now = time.monotonic()
        if now - self._summary_at >= max_age:
            self._summary = {
                "steps": self.recorder.step_summary(only=progress.LIVE_STEPS),
                "errors_total": self.recorder.errors_total(),
            }
            self._summary_at = now
        return self._summary

    def absorb(self, message: dict[str, Any]) -> None:
        worker = message["worker"]
        if "fatal" in message:
            self.fatal[worker] = message["fatal"]
            self.finished.add(worker)
            return
        self.recorder.merge(message["metrics"])
        self.connected[worker] = message["connected"]
        self.onboarded[worker] = message["onboarded"]
        self.failed[worker] = message["failed"]
        self.rss_kb[worker] = message["max_rss_kb"]
        self.rss_now_kb[worker] = message["rss_kb"]
        if message["ceiling_connects"] is not None:
            self.ceiling_connects[worker] = message["ceiling_connects"]
        self.baseline_rss_kb[worker] = message["baseline_rss_kb"]
        self.cpu_s[worker] = message["cpu_s"]
        self.things += message["things"]
        if message["final"]:
            self.finished.add(worker)
        total = sum(self.connected.values())
        if total >= self.peak_connected and total:
            self.rss_at_peak_kb = sum(self.rss_now_kb.values())
        self.peak_connected = max(self.peak_connected, total)
        self.recorder.gauge("devices_connected", total)


#: Where in the output folder the local broker side's logs are copied (no key, no registry).
BROKER_LOGS = "broker-logs"


def copy_broker_logs(files: RunFiles, output: Path, console: Console) -> None:
    """The broker's and the services' logs into ``output/broker-logs`` (what a user needs to
    debug a run once the work folder is gone); nothing else of the work folder."""
    logs = [path for path in (files.log, files.services_log) if path.is_file()]
    folder = output / BROKER_LOGS
    try:
        if logs:
            folder.mkdir(parents=True, exist_ok=True)
        for path in logs:
            shutil.copyfile(path, folder / path.name)
    except OSError as exc:
        console.print(f"warning: could not copy the broker's logs to {folder}: {exc.strerror}")


@contextmanager
def broker_side(scenario: Scenario, output: Path, console: Console) -> Iterator[dict[str, Any]]:
    """The broker to use: the scenario's, or a local one started (and stopped) here.

    The local one lives in a private temporary folder (broker.local), never in ``output``:
    only its logs are copied there when it stops."""
    if scenario.endpoint is not None:
        yield {
            "endpoint": scenario.endpoint,
            "port": scenario.port,
            "ca_file": scenario.ca_file,
            "claim": (scenario.claim_certificate, scenario.claim_key),
            "pki": None,
        }
        return

    def announce(side: LocalBrokerSide) -> None:
        console.print(
            f"starting the local broker side on {HOST}:{side.config.port} (throw-away PKI in "
            f"{side.folder}, removed at the end; logs in {output / BROKER_LOGS})",
            soft_wrap=True,  # one line in a log or a pipe too, whatever its width
        )

    def copy_logs(side: LocalBrokerSide) -> None:  # also after a failed start: they say why
        copy_broker_logs(side.files, output, console)

    with local_broker_side("fleet-sim-broker-", announce=announce, on_exit=copy_logs) as side:
        yield {
            "endpoint": "localhost",
            "port": side.config.port,
            "ca_file": side.pki.ca_cert,
            "claim": (side.pki.claim_cert, side.pki.claim_key),
            "pki": side.pki,
            "services_client_id": side.config.services_client_id,
        }


class Operator:
    """The operator side: reads $SYS, changes desired state. Needs the service identity, so
    only with the local broker side."""

    def __init__(self, pki: PkiPaths, port: int, state: FleetState, lock: threading.Lock) -> None:
        self.state = state
        self.lock = lock
        self.client = service_connect(
            "127.0.0.1",
            port,
            context=service_tls(pki.ca_cert, pki.service_cert, pki.service_key),
            client_id=wire.operator_client_id("sim-operator"),
        )
        self.client.on_message = self._on_message
        self._counters: dict[str, tuple[float, float]] = {}  # name -> (time, value)
        for topic in (*SYS_TOPICS, *SYS_COUNTERS, wire.SERVICE_STATS_TOPIC):
            self.client.subscribe(topic, qos=0)
        self.desired_sent = 0

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == wire.SERVICE_STATS_TOPIC:
            self._on_service_stats(message.payload)
            return
        name = SYS_TOPICS.get(message.topic)
        try:
            value = float(message.payload)
        except ValueError:
            return
        rate_name = SYS_COUNTERS.get(message.topic)
        if rate_name:
            now = time.time()
            before = self._counters.get(rate_name)
            self._counters[rate_name] = (now, value)
            if before is not None and now > before[0] and value >= before[1]:
                with self.lock:
                    rate = (value - before[1]) / (now - before[0])
                    self.state.recorder.gauge(rate_name, round(rate, 1))
            return
        if name:
            with self.lock:
                self.state.broker[name] = value
                self.state.recorder.gauge(name, value)

    def _on_service_stats(self, payload: bytes | bytearray) -> None:
        try:
            stats = json.loads(payload)
        except ValueError:
            return
        with self.lock:
            for key, value in stats.items():
                if key in SERVICE_DEPTHS and isinstance(value, int | float):
                    self.state.services[key] = max(self.state.services.get(key, 0), value)
                    self.state.recorder.gauge(f"services_{key}", value)

    def desire(self) -> None:
        with self.lock:
            things = self.state.things
            thing = random.choice(things) if things else None
        if thing is None:
            return
        desired: dict[str, object] = {"mode": random.choice(["eco", "boost", "off"])}
        desired[SENT_AT_KEY] = time.time()
        document = {"state": {"desired": desired}}
        self.client.publish(wire.shadow_topic(thing, "update"), json.dumps(document), qos=1)
        self.desired_sent += 1

    def close(self) -> None:
        service_disconnect(self.client)


def run_fleet(scenario: Scenario, output: Path, console: Console) -> dict[str, Any]:
    output.mkdir(parents=True, exist_ok=True)
    # Ctrl-C (and SIGTERM, which does what Ctrl-C does: simulator/cli.py) stops the fleet at
    # the next tick of the clock; a second one abandons the graceful stop. From the start:
    # one during the broker side's start-up lets it finish, then stops with a report.
    interrupt = _Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt.handler)
    try:
        with broker_side(scenario, output, console) as broker:
            report = _run_against(scenario, output, console, broker, interrupt)
    finally:
        signal.signal(signal.SIGINT, previous)
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _run_against(
    scenario: Scenario,
    output: Path,
    console: Console,
    broker: dict[str, Any],
    interrupt: _Interrupt,
) -> dict[str, Any]:
    """The fleet against ``broker``, the report and its plots (unwritten: the caller)."""
    claim_files: list[tuple[Path, Path]] = [broker["claim"]]
    if scenario.claim == "per-device" and not interrupt.requested.is_set():
        console.print(f"issuing {scenario.devices} claim certificates …")
        claim_files = bootstrap.issue_claims(
            broker["pki"].root, name="fleet-sim", count=scenario.devices
        )
    target = Target(
        broker["endpoint"],
        broker["port"],
        Path(broker["ca_file"]),
        template=scenario.template,
        timeout=scenario.timeout,
    )
    # Every worker starts the same clock; spawned processes need about a second to start.
    ceiling: tuple[float, float] | None = None
    started = time.time() + 1.0
    if scenario.ceiling_seconds:
        ceiling = (time.time() + 2.0, time.time() + 2.0 + scenario.ceiling_seconds)
        started = ceiling[1] + 0.5  # the last bare connects end before the first device
    state = FleetState(Recorder(ceiling[0] if ceiling else started))
    lock = threading.Lock()
    operator = Operator(broker["pki"], broker["port"], state, lock) if broker["pki"] else None
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    stop, storm = context.Event(), context.Event()
    workers = scenario.worker_count
    processes = [
        context.Process(
            target=worker_main,
            args=(
                WorkerPlan(i, workers, scenario, target, started, tuple(claim_files), ceiling),
                out,
                stop,
                storm,
            ),
            name=f"fleet-sim-worker-{i}",
        )
        for i in range(workers)
    ]
    clock = progress.Progress(scenario, started, ceiling)
    interrupted = interrupt.requested.is_set()  # during the broker side's start-up
    try:
        if not interrupted:
            for process in processes:
                process.start()
            with progress.display(console) as screen:

                def show(phase: str) -> None:
                    screen.update(phase, lambda age: _snapshot(clock, state, phase, age))

                interrupted = _drive(
                    scenario,
                    state,
                    lock,
                    out,
                    stop,
                    storm,
                    operator,
                    clock,
                    show,
                    processes,
                    interrupt,
                )
                show("interrupted" if interrupted else "stopping")
    finally:
        stop.set()
        _collect_until_done(state, lock, out, processes)
        for process in processes:
            if process.pid is None:
                continue  # never started
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        if operator is not None:
            operator.close()
    report = _report(scenario, state, started, interrupted, operator, workers)
    if ceiling is not None:
        report["ceiling"] = _ceiling(scenario, state, report["steps"])
    report = _self_describing(report, broker, started)
    title = f"fleet-sim: {scenario.devices} devices at {scenario.rate:g}/s"
    written = write_plots(state.recorder.timeline(), output, title, _phases(state))
    report["plots"] = [str(p) for p in written]
    return report


def _phases(state: FleetState) -> list[tuple[str, float, float]]:
    """Onboarding, hold and storm as offsets from the run's start, for the plots' bands."""
    origin = state.recorder.started
    end = time.time() - origin
    hold = state.hold_started - origin if state.hold_started is not None else end
    storm = state.storm_started - origin if state.storm_started is not None else None
    phases = [("onboarding", 0.0, hold), ("hold", hold, storm if storm is not None else end)]
    if storm is not None:
        phases.append(("storm", storm, end))
    return phases


class _Interrupt:
    """A SIGINT handler for the run: the first signal asks for a graceful stop (the fleet
    disconnects, the report is written), a second one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def handler(self, _signum: int, _frame: object) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt
        self.requested.set()


def _drive(
    scenario: Scenario,
    state: FleetState,
    lock: threading.Lock,
    out: Queue[WorkerMessage],
    stop: Event,
    storm: Event,
    operator: Operator | None,
    clock: progress.Progress,
    show: Callable[[str], None],
    processes: Sequence[BaseProcess],
    interrupt: _Interrupt,
) -> bool:
    """The run's clock: onboarding, hold, storm, stop; ``show(phase)`` shows the progress.
    True if interrupted."""
    desired_every = 1 / scenario.desired_rate if scenario.desired_rate else None
    next_desired = time.time() + (desired_every or 0)
    hold_started: float | None = None
    try:
        while True:
            if interrupt.requested.is_set():
                return True
            _drain(state, lock, out, timeout=0.2)
            now = time.time()
            total = sum(state.onboarded.values()) + sum(state.failed.values())
            if hold_started is None and (
                total >= scenario.devices or len(state.finished) == len(processes)
            ):
                hold_started = state.hold_started = now
            if hold_started is not None:
                if (
                    scenario.storm_at is not None
                    and not storm.is_set()
                    and now >= hold_started + scenario.storm_at
                ):
                    storm.set()
                    state.storm_started = now
                if now >= hold_started + scenario.hold:
                    return False
            phase = clock.phase(now, holding=hold_started is not None, storm=storm.is_set())
            if operator is not None and desired_every and now >= next_desired:
                operator.desire()
                next_desired = now + desired_every
            if any(not p.is_alive() for p in processes) and len(state.finished) < len(processes):
                dead = [p.name for p in processes if not p.is_alive() and p.exitcode]
                if dead:
                    phase = f"worker(s) died: {', '.join(dead)}"
            show(phase)
    except KeyboardInterrupt:
        return True


def _drain(
    state: FleetState, lock: threading.Lock, out: Queue[WorkerMessage], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = out.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return
        with lock:
            state.absorb(message)


def _collect_until_done(
    state: FleetState,
    lock: threading.Lock,
    out: Queue[WorkerMessage],
    processes: Sequence[BaseProcess],
) -> None:
    deadline = time.monotonic() + 60
    while len(state.finished) < len(processes) and time.monotonic() < deadline:
        if all(not p.is_alive() for p in processes) and out.empty():
            break
        _drain(state, lock, out, timeout=0.2)


def _snapshot(
    clock: progress.Progress, state: FleetState, phase: str, max_age: float
) -> progress.Snapshot:
    summary = state.live_summary(max_age)
    return clock.snapshot(
        phase,
        onboarded=sum(state.onboarded.values()),
        failed=sum(state.failed.values()),
        connected=sum(state.connected.values()),
        errors=summary.get("errors_total", 0),
        steps=summary.get("steps", {}),
        hold_started=state.hold_started,
    )


def _report(
    scenario: Scenario,
    state: FleetState,
    started: float,
    interrupted: bool,
    operator: Operator | None,
    workers: int,
) -> dict[str, Any]:
    summary = state.recorder.summary()
    onboarded = sum(state.onboarded.values())
    grown_kb = sum(state.rss_kb.values()) - sum(state.baseline_rss_kb.values())
    return {
        "scenario": asdict(scenario),
        "interrupted": interrupted,
        "processes": workers,
        "devices": {
            "target": scenario.devices,
            "onboarded": onboarded,
            "failed": sum(state.failed.values()),
            "peak_connected": state.peak_connected,
        },
        "steps": summary.get("steps", {}),
        # The same, over the steady hold only: after onboarding, before any storm.
        "steps_holding": _phase(state, state.hold_started, state.storm_started),
        "steps_storm": _phase(state, state.storm_started, None),
        "errors": summary.get("errors", {}),
        "errors_total": summary.get("errors_total", 0),
        "error_messages": summary.get("error_messages", {}),
        "broker": dict(state.broker),
        "services": dict(state.services),
        "desired_changes_sent": operator.desired_sent if operator else 0,
        "simulator": {
            "max_rss_mb_per_process": {w: round(kb / 1024, 1) for w, kb in state.rss_kb.items()},
            # Peak RSS beyond each process's start-up size, over the peak connected fleet.
            "kb_per_connected_device": round(grown_kb / state.peak_connected, 1)
            if state.peak_connected
            else None,
            # RSS when the most devices were connected, beyond start-up: what they hold.
            "kb_per_device_held": round(
                (state.rss_at_peak_kb - sum(state.baseline_rss_kb.values())) / state.peak_connected,
                1,
            )
            if state.peak_connected
            else None,
            "devices_per_process": round(state.peak_connected / workers),
            "cpu_s": {w: round(s, 2) for w, s in state.cpu_s.items()},
        },
        "worker_errors": state.fatal,
        "duration_s": round(time.time() - started, 2),
    }


#: What report.json's less obvious figures mean, written into it ("notes").
REPORT_NOTES = {
    "started_at": "when the first device was due to arrive (UTC); duration_s counts from it, "
    "and a ceiling measurement (ceiling.seconds) comes before it",
    "endpoint": "the broker the devices connected to; local: a broker side this run started "
    "on a free port (scenario.port is that port too)",
    "steps": "per step: count, rate_per_s (completions per second while it ran), "
    "mean/p50/p90/p99/max in milliseconds (nearest-rank percentiles); label: its name in the "
    "README and the tables",
    "simulator.kb_per_connected_device": "KB (1024 bytes) of resident memory (RSS) per device: "
    "the simulator processes' peak RSS beyond their size at start-up, over the most devices "
    "connected at once; it includes onboarding's passing memory, so an upper bound",
    "simulator.kb_per_device_held": "KB of RSS per device when the most devices were "
    "connected, beyond start-up: what a connected device holds; the figure to size a machine",
    "broker.broker_stored_messages": "Mosquitto's $SYS/broker/store/messages/count at the "
    "end: messages in its store, mostly its own retained $SYS topics, plus retained messages "
    "and QoS 1 messages not yet acknowledged; no persistent session (the devices keep none)",
    "broker.broker_msgs_received_per_min, broker.broker_msgs_sent_per_min": "Mosquitto's "
    "1-minute load averages of messages received and sent, as its $SYS topics give them",
    "services": "the fleet services' deepest queues over the run (local broker side only)",
}


def _self_describing(
    report: dict[str, Any], broker: dict[str, Any], started: float
) -> dict[str, Any]:
    """The report with what a reader needs without the command line: tool version, start
    time, the endpoint really used, step labels and notes on the figures."""
    local = broker["pki"] is not None
    endpoint = {"host": broker["endpoint"], "port": broker["port"], "local": local}
    report["scenario"]["port"] = broker["port"]  # not the default 8883 of a local run
    for phase in ("steps", "steps_holding", "steps_storm"):
        for step, figures in report[phase].items():
            figures["label"] = step_label(step)
    at = datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")
    return {
        "fleet_sim_version": distribution_version(),
        "started_at": at.replace("+00:00", "Z"),
        "endpoint": endpoint,
        **report,
        "notes": REPORT_NOTES,
    }


def _phase(state: FleetState, start: float | None, end: float | None) -> dict[str, Any]:
    if start is None:
        return {}
    recorder = state.recorder
    until = end - recorder.started if end is not None else float("inf")
    return recorder.step_summary(since=start - recorder.started, until=until)


def _ceiling(scenario: Scenario, state: FleetState, steps: dict[str, Any]) -> dict[str, Any]:
    """Bare connects/s before the fleet, and the onboarding rate as a share of it (each
    onboarding makes two connections, so half the ceiling is the most it could reach)."""
    connects = sum(state.ceiling_connects.values())
    # From the completions' own span, as every rate here: a worker that started late must not
    # read as a slower broker.
    per_s = steps.get(CEILING_STEP, {}).get("rate_per_s", 0.0)
    onboarding = steps.get("onboarding", {}).get("rate_per_s", 0.0)
    return {
        "seconds": scenario.ceiling_seconds,
        "connects": connects,
        "connects_per_s": round(per_s, 1),
        "onboarding_per_s": onboarding,
        "onboarding_share": round(onboarding / per_s, 3) if per_s else None,
        "connections_share": round(2 * onboarding / per_s, 3) if per_s else None,
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    devices = report["devices"]
    console.print(
        f"[bold]{devices['onboarded']}/{devices['target']} devices onboarded[/], "
        f"{devices['failed']} failed, peak {devices['peak_connected']} connected, "
        f"{report['errors_total']} errors, {report['duration_s']} s"
        + (" (interrupted)" if report["interrupted"] else ""),
        soft_wrap=True,  # text lines stay whole in a log; only the tables fit the width
    )
    table = Table(title="steps (ms)")
    for column in ("step", "count", "rate/s", "p50", "p90", "p99", "max"):
        table.add_column(column, justify="left" if column == "step" else "right")
    steps = report["steps"]
    for step in in_step_order(steps):
        s = steps[step]
        table.add_row(
            step_label(step),
            str(s["count"]),
            f"{s['rate_per_s']:.1f}",
            *(f"{s[k]:.1f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
        )
    console.print(table)
    for phase, label, step in (
        ("steps_holding", "steady hold", "shadow_update"),
        ("steps_storm", "reconnect storm", "reconnect"),
    ):
        s = report.get(phase, {}).get(step)
        if s:
            console.print(
                f"{label}: {step_label(step)} {s['count']} at {s['rate_per_s']:.1f}/s, "
                f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms",
                soft_wrap=True,
            )
    if report["errors"]:
        errors = Table(title="errors")
        for column in ("step", "kind", "count", "first message"):
            errors.add_column(column)
        messages = report.get("error_messages", {})
        for step, kinds in report["errors"].items():
            for kind, count in kinds.items():
                first = messages.get(step, {}).get(kind, "")
                errors.add_row(step_label(step), kind, str(count), first)
        console.print(errors)
    simulator = report["simulator"]
    held = simulator["kb_per_connected_device"]
    memory = f"{held} KB RSS per connected device" if held is not None else "no device connected"
    broker = ", ".join(f"{k} {v:g}" for k, v in report["broker"].items())
    console.print(
        f"simulator: {report['processes']} process(es), {memory}"
        + (f"; broker: {broker}" if broker else ""),
        soft_wrap=True,
    )
    if report.get("services"):
        console.print(
            "services (max over the run): "
            + ", ".join(f"{k} {v:g}" for k, v in report["services"].items()),
            soft_wrap=True,
        )
    if "ceiling" in report:
        c = report["ceiling"]
        console.print(
            f"ceiling: {c['connects_per_s']:.1f} bare mutual-TLS connects/s over "
            f"{c['seconds']:g} s; onboarding {c['onboarding_per_s']:.1f}/s = "
            f"{(c['onboarding_share'] or 0) * 100:.0f}% of it (two connections each: "
            f"{(c['connections_share'] or 0) * 100:.0f}% of the connect capacity)",
            soft_wrap=True,
        )
    for path in report.get("plots", []):
        console.print(f"plot: {path}", soft_wrap=True)
