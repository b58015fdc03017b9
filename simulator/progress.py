"""`fleet-sim run`'s progress while it runs: where it is (phase, elapsed, ETA, arrival rate,
counts, latency) as a live table in a terminal, and as plain lines anywhere else (a CI log, a
pipe, a file), one every few seconds and at each change of phase, as emqtt-bench prints them:
a redrawn table in a log is one frame glued to the next.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

from simulator.metrics import step_label
from simulator.scenario import Scenario

#: Seconds between two plain progress lines (a phase change prints at once).
PLAIN_EVERY = 5.0
#: The live table's latency figures are this old at most: summarising sorts every sample, and
#: this process shares the cores with the fleet it measures.
LIVE_SUMMARY_AGE = 2.0
#: Arrivals per second are measured over this many seconds.
RATE_WINDOW = 5.0
LIVE_STEPS = ("onboarding", "shadow_update", "reconnect")


@dataclass(frozen=True)
class Snapshot:
    """The run at one moment, as the display shows it."""

    phase: str
    elapsed_s: float
    devices: int
    onboarded: int
    failed: int
    connected: int
    arrivals_per_s: float
    target_rate: float
    eta_s: float | None
    errors: int
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)


class ArrivalMeter:
    """Devices arrived (onboarded or given up) per second, over the last RATE_WINDOW seconds."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, now: float, arrived: int) -> float:
        self._samples.append((now, arrived))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        first_at, first = self._samples[0]
        return (arrived - first) / (now - first_at) if now > first_at else 0.0


def eta_seconds(
    scenario: Scenario,
    *,
    now: float,
    started: float,
    hold_started: float | None,
    arrived: int,
    rate: float,
) -> float:
    """Seconds until the run ends: the arrivals still to come (on the schedule, or at the
    measured rate when that is slower), then the hold."""
    if hold_started is not None:
        return max(0.0, hold_started + scenario.hold - now)
    scheduled = max(0.0, started + scenario.arrival_offset(scenario.devices - 1) - now)
    remaining = scenario.devices - arrived
    measured = remaining / rate if rate > 0 and now > started else 0.0
    return max(scheduled, measured) + scenario.hold


@dataclass
class Progress:
    """The run's clock as the display sees it: when it began, when the devices start to
    arrive, and the optional connect-ceiling window before them (wall-clock times)."""

    scenario: Scenario
    started: float
    ceiling: tuple[float, float] | None = None
    began: float = field(default_factory=time.time)
    meter: ArrivalMeter = field(default_factory=ArrivalMeter)

    def phase(self, now: float, *, holding: bool, storm: bool) -> str:
        if storm:
            return "storm"
        if holding:
            return "holding"
        if self.ceiling is not None and now < self.ceiling[1]:
            return "ceiling" if now >= self.ceiling[0] else "starting"
        return "onboarding" if now >= self.started else "starting"

    def snapshot(
        self,
        phase: str,
        *,
        onboarded: int,
        failed: int,
        connected: int,
        errors: int,
        steps: dict[str, dict[str, Any]],
        hold_started: float | None,
        now: float | None = None,
    ) -> Snapshot:
        now = time.time() if now is None else now
        arrived = onboarded + failed
        rate = self.meter.rate(now, arrived)
        eta = eta_seconds(
            self.scenario,
            now=now,
            started=self.started,
            hold_started=hold_started,
            arrived=arrived,
            rate=rate,
        )
        return Snapshot(
            phase=phase,
            elapsed_s=now - self.began,
            devices=self.scenario.devices,
            onboarded=onboarded,
            failed=failed,
            connected=connected,
            arrivals_per_s=rate,
            target_rate=self.scenario.rate,
            eta_s=None if phase in ("stopping", "interrupted") else eta,
            errors=errors,
            steps=steps,
        )


def _seconds(value: float) -> str:
    value = max(0.0, value)
    return f"{value:.0f} s" if value < 120 else f"{value // 60:.0f} min {value % 60:02.0f} s"


def _latency(steps: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for step in LIVE_STEPS:
        s = steps.get(step)
        if s:
            yield (
                step_label(step),
                f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms ({s['count']} done)",
            )


def table(snapshot: Snapshot) -> Table:
    s = snapshot
    table = Table(title=f"fleet-sim run: {s.devices} devices, {s.phase}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    eta = f", about {_seconds(s.eta_s)} to go" if s.eta_s is not None else ""
    table.add_row("elapsed", _seconds(s.elapsed_s) + eta)
    table.add_row("arrivals", f"{s.arrivals_per_s:.1f}/s (scenario {s.target_rate:g}/s)")
    table.add_row("onboarded", f"{s.onboarded} / {s.devices}")
    table.add_row("connected", str(s.connected))
    table.add_row("failed", str(s.failed))
    table.add_row("errors", str(s.errors))
    for name, figures in _latency(s.steps):
        table.add_row(name, figures)
    table.caption = f"latency figures are up to {LIVE_SUMMARY_AGE:g} s older than the counts"
    return table


def line(snapshot: Snapshot) -> str:
    s = snapshot
    fields = [
        f"onboarded {s.onboarded}/{s.devices}",
        f"connected {s.connected}",
        f"failed {s.failed}",
        f"errors {s.errors}",
        f"arrivals {s.arrivals_per_s:.1f}/s",
    ]
    if s.eta_s is not None:
        fields.append(f"eta {s.eta_s:.0f}s")
    fields += [f"{name} {figures}" for name, figures in _latency(s.steps)]
    return f"{s.elapsed_s:6.1f}s {s.phase}: {', '.join(fields)}"


#: Makes a snapshot whose latency figures are at most that many seconds old.
MakeSnapshot = Callable[[float], Snapshot]


class Display(Protocol):
    def update(self, phase: str, make: MakeSnapshot) -> None: ...


class LiveDisplay:
    """A terminal: the table, redrawn in place."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def update(self, phase: str, make: MakeSnapshot) -> None:
        self.live.update(table(make(LIVE_SUMMARY_AGE)))


class LineDisplay:
    """Not a terminal: a line every PLAIN_EVERY seconds and at each new phase."""

    def __init__(self, console: Console, every: float = PLAIN_EVERY) -> None:
        self.console = console
        self.every = every
        self._phase: str | None = None
        self._printed_at = -float("inf")

    def update(self, phase: str, make: MakeSnapshot) -> None:
        now = time.monotonic()
        if phase == self._phase and now - self._printed_at < self.every:
            return
        self._phase, self._printed_at = phase, now
        # Fresh figures: a line is printed once, so it must not mix ages. soft_wrap: one
        # line each, however narrow a pipe's 80 columns.
        self.console.print(line(make(0.0)), soft_wrap=True, markup=False, highlight=False)


@contextmanager
def display(console: Console) -> Iterator[Display]:
    """The display that suits ``console``; a live one ends on its own line."""
    if not console.is_terminal:
        yield LineDisplay(console)
        return
    with Live(console=console, refresh_per_second=4) as live:
        yield LiveDisplay(live)
