"""What `fleet-sim demo` found, and the tables it prints at the end.

The report holds numbers and verdicts only: thing names, certificate id prefixes, reason codes
and timings. No key, certificate body or ownership token ever reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulator.metrics import format_ms, in_step_order, step_label


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    devices: int = 0
    workdir: Path | None = None
    endpoint: str = ""
    external: bool = False  # against a broker side that ran already (--endpoint)
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # Recorder.summary() steps
    errors: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> kind -> count
    onboarding: dict[str, Any] = field(default_factory=dict)
    shadow: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append(Check(name, passed, detail))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


def _verdict(passed: bool) -> str:
    return "[green]pass[/]" if passed else "[red]FAIL[/]"


def _onboarding_table(report: Report) -> Table:
    o = report.onboarding
    # A two-column list of figures: a header row would only be empty.
    table = Table(
        title="Onboarding: Fleet Provisioning by claim (one shared claim certificate)",
        show_header=False,
    )
    table.add_column("figure")
    table.add_column("value", overflow="fold")
    table.add_row(
        "devices onboarded",
        f"{o.get('onboarded', 0)}/{report.devices} "
        f"(1 fleet-agent process + {o.get('virtual', 0)} virtual devices on the agent code)",
    )
    onboarding = report.steps.get("onboarding")
    if onboarding:
        table.add_row(
            "virtual devices",
            f"{o.get('virtual_onboarded', 0)} in {o.get('virtual_seconds', 0):.2f} s = "
            f"{o.get('rate_per_s', 0):.0f} devices/s, at most {o.get('concurrency')} at once",
        )
        table.add_row(
            "latency (claim connect -> own connection subscribed)",
            ", ".join(
                f"{label} {format_ms(onboarding[key])}"
                for label, key in (("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"))
            )
            + f", max {format_ms(onboarding['max_ms'])}",
        )
    if o.get("agent_thing") and o.get("agent_owned", True):
        table.add_row(
            "fleet-agent process",
            f"thing {o['agent_thing']}: provisioned {o.get('agent_provisioned_s', 0):.2f} s, "
            f"first shadow report {o.get('agent_reported_s', 0):.2f} s after start "
            "(both include the interpreter's start-up)",
        )
    elif o.get("agent_thing"):
        table.add_row(
            "fleet-agent (running already)",
            f"thing {o['agent_thing']}: online {o.get('agent_provisioned_s', 0):.2f} s, its "
            f"device facts in the shadow {o.get('agent_reported_s', 0):.2f} s after the demo "
            "began",
        )
    return table


def _steps_table(report: Report) -> Table:
    table = Table(title="Every step, measured (ms)")
    for column in ("step", "count", "p50", "p90", "p99", "max"):
        table.add_column(column, justify="left" if column == "step" else "right")
    ordered = in_step_order(report.steps)
    for step in ordered:
        s = report.steps[step]
        table.add_row(
            step_label(step),
            str(s["count"]),
            *(f"{s[k]:.1f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
        )
    return table


def _checks_table(report: Report) -> Table:
    table = Table(title="What the demo checked")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        table.add_row(c.name, _verdict(c.passed), c.detail)
    return table


def _errors_table(report: Report) -> Table:
    table = Table(title="errors (retried where a device would retry)")
    for column in ("step", "kind", "count"):
        table.add_column(column)
    for step, kinds in report.errors.items():
        for kind, count in kinds.items():
            table.add_row(step_label(step), kind, str(count))
    return table


def _timings_table(report: Report) -> Table:
    table = Table(title="Phases")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for label, seconds in report.timings.items():
        table.add_row(label, f"{seconds:.2f}")
    table.add_row("[bold]total[/]", f"{sum(report.timings.values()):.2f}")
    return table


def print_report(report: Report, console: Console) -> None:
    if report.onboarding:
        console.print(_onboarding_table(report))
    if report.steps:
        console.print(_steps_table(report))
    if report.errors:
        console.print(_errors_table(report))
    console.print(_checks_table(report))
    console.print(_timings_table(report))
    if report.workdir is not None and report.external:
        console.print(
            f"work folder {report.workdir}: the agent's config, state and log in fleet-agent/"
        )
    elif report.workdir is not None:
        console.print(
            f"work folder {report.workdir}: PKI and registry in certs/, broker and services logs "
            "in certs/run/, the agent's config, state and log in fleet-agent/"
        )
    failed = [c.name for c in report.checks if not c.passed]
    if report.passed:
        console.print(f"[bold green]PASS[/]: all {len(report.checks)} checks passed")
    else:
        console.print(f"[bold red]FAIL[/]: {len(failed)} check(s) failed: {'; '.join(failed)}")
