"""``fleet-sim``, the fleet simulator's command line: ``demo``, ``run`` and ``locust``."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from agent import distribution_version
from broker import children
from broker.config import ConfigError
from broker.mosquitto import BrokerError
from broker.mqtt import ConnectError
from broker.pki import PkiError
from simulator import locust_command
from simulator.scenario import Scenario

# One scheme for fleet-broker, fleet-agent and fleet-sim (SIGTERM: 128 + 15).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = (
    "exit codes: 0 done (demo: PASS), 1 failed (demo: FAIL; run: not every device onboarded), "
    "2 bad command line or configuration, 3 broker unreachable (try again), 130 Ctrl-C, "
    "143 SIGTERM. A closed standard output (| head) is not a failure: the command goes on "
    "quietly and exits as it would have."
)
DESCRIPTION = (
    "The fleet simulator: virtual devices that run the agent's own claim flow and shadow sync, "
    "against the local broker side it starts (or one that runs already, --endpoint). "
    "`demo` checks the whole system and says PASS or FAIL, `run` measures a fleet and writes a "
    "report, `locust` load-tests with Locust."
)
EPILOG = f"""\
examples:
  fleet-sim demo                                  # local fleet cloud, 20 devices, PASS/FAIL
  fleet-sim run --devices 500 --rate 50 --storm-at 5 --out results/
  fleet-sim locust --local --headless -u 200 -r 50 -t 2m

SIGTERM (kill, timeout, a CI cancel) stops every command as Ctrl-C does: what it started is
stopped and `run` still writes its report. Nothing it starts outlives it, even if it is killed
(SIGKILL).

{textwrap.fill(EXIT_CODES, 92)}
"""


class _Console(Console):
    """Rich's console, but a reader that goes away (``| head``) only silences it: rich's own
    answer is SystemExit(1), which reads as a failed run or a FAIL."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    return sub.add_parser(name, epilog=EXIT_CODES, help=help, description=description)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-sim",
        description=textwrap.fill(DESCRIPTION, 92),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {distribution_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_run(sub)
    locust_command.add_parser(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = _subcommand(
        sub,
        "demo",
        help="bring up a local fleet cloud, run a small fleet against it, report PASS or FAIL",
        description="Start a broker side (fresh PKI and registry, Mosquitto with the plugin, the "
        "fleet services) on a free port, onboard a fleet by claim (one real fleet-agent process, "
        "the rest virtual devices on the agent's code), drive shadow traffic, try the attacks the "
        "plugin stops and revoke a device; then stop everything and print what was measured and "
        "checked. Exit 0 only if every check passed (PASS).",
    )
    demo.add_argument("--devices", type=int, default=20, help="fleet size, 2 to 2000 (default 20)")
    demo.add_argument("--dir", type=Path, help="work folder (default: a new temp folder)")
    demo.add_argument(
        "--port", type=int, help="broker port (default: a free one; 8883 with --endpoint)"
    )
    demo.add_argument(
        "--endpoint",
        help="a broker side that runs already (docker compose's), instead of starting one",
    )
    demo.add_argument(
        "--pki",
        type=Path,
        metavar="DIR",
        help="with --endpoint: that side's fleet-broker --dir folder (CA certificate, claim "
        "and service identities; CA key and registry for the revocation)",
    )
    demo.add_argument(
        "--agent-control",
        type=Path,
        metavar="SOCKET",
        help="with --endpoint: use the fleet-agent running with this control socket instead "
        "of starting one",
    )


#: `run`'s options: flag, type (or its choices), metavar, help; "{default}" is the scenario's
#: own default, so help and behaviour cannot drift apart.
RUN_FLAGS: tuple[tuple[str, type | tuple[str, ...], str | None, str], ...] = (
    ("--devices", int, "N", "fleet size ({default})"),
    ("--rate", float, "PER_S", "arrivals per second, the peak of a linear ramp ({default})"),
    ("--ramp", ("constant", "linear"), None, "arrival ramp shape ({default})"),
    ("--ramp-seconds", float, "SECONDS", "linear ramp duration ({default})"),
    ("--concurrency", int, "N", "onboardings in flight at most, whole fleet ({default})"),
    ("--processes", int, "N", "simulator processes ({default}: automatic)"),
    ("--devices-per-process", int, "N", "devices per process when automatic ({default})"),
    ("--update-interval", float, "SECONDS", "shadow update period, 0: none ({default})"),
    ("--update-bytes", int, "BYTES", "padding per shadow update ({default})"),
    ("--hold", float, "SECONDS", "connected after the last arrival ({default})"),
    ("--churn", float, "PER_S", "drops and reconnects per second ({default})"),
    ("--storm-at", float, "SECONDS", "into the hold: all drop and reconnect (default: no storm)"),
    (
        "--claim",
        ("shared", "per-device"),
        None,
        "one for all, or per device (local broker only) ({default})",
    ),
    ("--desired-rate", float, "PER_S", "operator desired changes/s, local broker only ({default})"),
    ("--endpoint", str, "HOST", "an existing broker (default: start a local one on a free port)"),
    ("--port", int, "PORT", "the --endpoint's port ({default})"),
    ("--ca-file", Path, "FILE", "with --endpoint: the CA certificate that signed the broker's"),
    ("--claim-certificate", Path, "FILE", "with --endpoint: the claim certificate to onboard with"),
    ("--claim-key", Path, "FILE", "with --endpoint: the claim certificate's private key"),
    ("--timeout", float, "SECONDS", "per connect and request ({default})"),
    (
        "--ceiling-seconds",
        float,
        "SECONDS",
        "first measure bare mutual-TLS connects/s this long ({default}: no)",
    ),
)


def _default(flag: str) -> str:
    value = getattr(Scenario, flag[2:].replace("-", "_"))
    return f"default {value:g}" if isinstance(value, int | float) else f"default {value}"


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = _subcommand(
        sub,
        "run",
        help="onboard and run a virtual fleet, measured (local broker side unless --endpoint)",
        description="Each virtual device runs the agent's claim flow and shadow sync with its "
        "own key and certificate. Options override the scenario file; the defaults are the "
        "scenario's. Progress is a live table in a terminal, a plain line every few seconds "
        "elsewhere; at the end a table of every step, and report.json plus plots in --out.",
    )
    run.add_argument(
        "scenario", nargs="?", type=Path, help="a scenario TOML file (keys as the options)"
    )
    for flag, kind, metavar, text in RUN_FLAGS:
        text = text.format(default=_default(flag))
        if isinstance(kind, tuple):
            run.add_argument(flag, choices=kind, help=text)
        else:
            run.add_argument(flag, type=kind, metavar=metavar, help=text)
    run.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="report folder (default fleet-sim-<time>): the report, plots and the local broker "
        "side's logs; its PKI and registry stay in a private temporary folder, removed at the end",
    )


RUN_OPTIONS = (
    *("devices", "rate", "ramp", "ramp_seconds", "concurrency", "processes"),
    *("devices_per_process", "update_interval", "update_bytes", "hold", "churn", "storm_at"),
    *("claim", "desired_rate", "endpoint", "port", "ca_file", "claim_certificate", "claim_key"),
    *("timeout", "ceiling_seconds"),
)


SETUP_ERRORS = (BrokerError, ConfigError, PkiError, ConnectError)


def setup_error_exit(exc: Exception) -> int:
    """One line on stderr, and the scheme's code for a broker side that could not be set up
    or reached."""
    print(f"fleet-sim: error: {exc}", file=sys.stderr)
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, ConnectError) and _unreachable(exc):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def _unreachable(exc: ConnectError) -> bool:
    """The network, not TLS or MQTT, said no (refused, no route, no answer): worth trying
    again. broker.mqtt raises ConnectError inside its ``except OSError``, so that error is
    the context; a TLS failure is an OSError too, but retrying will not fix a certificate."""
    cause = exc.__context__
    if cause is None:
        return str(exc).startswith("no CONNACK")
    return isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError)


def run_exit_code(report: dict[str, Any], devices: int) -> int:
    """0 every device onboarded, 3 none could even reach the broker, 1 otherwise; 130 (143
    after SIGTERM) when stopped, the report written all the same."""
    if report["interrupted"]:
        return children.interrupted_exit_code(EXIT_INTERRUPTED)
    if report["devices"]["onboarded"] == devices:
        return EXIT_OK
    errors = report["errors"]
    unreachable = set(errors) == {"connect"} and set(errors["connect"]) == {"unreachable"}
    return EXIT_UNREACHABLE if unreachable and not report["devices"]["onboarded"] else EXIT_FAILED


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    import time

    from simulator.run import print_report, run_fleet
    from simulator.scenario import ScenarioError, build

    try:
        scenario = build(args.scenario, {k: getattr(args, k) for k in RUN_OPTIONS})
    except ScenarioError as exc:
        for line in exc.problems:
            print(f"fleet-sim: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or Path(f"fleet-sim-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        report = run_fleet(scenario, out, console)
    except SETUP_ERRORS as exc:
        return setup_error_exit(exc)
    print_report(report, console)
    console.print(f"report: {out / 'report.json'}", soft_wrap=True)
    return run_exit_code(report, scenario.devices)


def demo_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with `fleet-sim demo`'s options, if anything."""
    if not 2 <= args.devices <= 2000:
        return "--devices must be between 2 and 2000"
    if args.port is not None and not 1 <= args.port <= 65535:
        return "--port must be between 1 and 65535"
    if args.endpoint is None:
        used = [o for o, v in (("--pki", args.pki), ("--agent-control", args.agent_control)) if v]
        if used:
            verb = "apply" if len(used) > 1 else "applies"
            return f"{' and '.join(used)} {verb} only with --endpoint (a running broker side)"
        return None
    if args.pki is None:
        return (
            "--endpoint needs --pki DIR, the broker side's fleet-broker --dir folder "
            "(the demo connects as the service identity and revokes a device there)"
        )
    if not args.pki.is_dir():
        return f"--pki {args.pki}: no such folder (the broker side's fleet-broker --dir folder)"
    return None


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    problem = demo_problem(args)
    if problem:
        print(f"fleet-sim: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from simulator.demo import print_report, run_demo, run_demo_against

    try:
        if args.endpoint:
            report = run_demo_against(
                args.devices,
                args.endpoint,
                args.port or 8883,
                args.pki,
                args.agent_control,
                args.dir,
                console,
            )
        else:
            report = run_demo(args.devices, args.dir, args.port, console)
    except SETUP_ERRORS as exc:
        return setup_error_exit(exc)
    print_report(report, console)
    return EXIT_OK if report.passed else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    children.sigterm_like_ctrl_c()
    try:
        if args.command == "locust":
            return locust_command.run(args)
        command = cmd_run if args.command == "run" else cmd_demo
        return command(args, _Console())
    except KeyboardInterrupt:
        return children.interrupted_exit_code(EXIT_INTERRUPTED)
    except BrokenPipeError:  # a plain print() to a closed stdout; rich's console copes itself
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
