"""``fleet-sim``: run fleets against the local broker side (the simulator grows here)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from broker import children
from broker.config import ConfigError
from broker.mosquitto import BrokerError
from broker.mqtt import ConnectError
from broker.pki import PkiError
from simulator import locust_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-sim",
        description=__doc__,
        epilog="SIGTERM (kill, timeout, a CI cancel) stops every command as Ctrl-C does: what "
        "it started is stopped, `run` still writes its report; the exit code is then 143. "
        "Nothing it starts outlives it, even if it is killed (SIGKILL).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="bring up a local fleet cloud, run a small fleet against it, report"
    )
    demo.add_argument("--devices", type=int, default=20, help="fleet size (default 20)")
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

    run = sub.add_parser(
        "run",
        help="onboard and run a virtual fleet, measured (local broker side unless --endpoint)",
        description="Each virtual device runs the agent's claim flow and shadow sync with its "
        "own key and certificate. Options override the scenario file.",
    )
    run.add_argument("scenario", nargs="?", type=Path, help="a scenario TOML file")
    run.add_argument("--devices", type=int, help="fleet size (default 100)")
    run.add_argument("--rate", type=float, help="arrivals per second (default 50)")
    run.add_argument("--ramp", choices=["constant", "linear"], help="arrival ramp shape")
    run.add_argument("--ramp-seconds", type=float, help="linear ramp duration")
    run.add_argument("--concurrency", type=int, help="onboardings in flight at most")
    run.add_argument("--processes", type=int, help="simulator processes (0: automatic)")
    run.add_argument("--devices-per-process", type=int, help="default 5000")
    run.add_argument("--update-interval", type=float, help="seconds between shadow updates")
    run.add_argument("--update-bytes", type=int, help="padding per shadow update")
    run.add_argument("--hold", type=float, help="seconds connected after the last arrival")
    run.add_argument("--churn", type=float, help="drops and reconnects per second")
    run.add_argument("--storm-at", type=float, help="seconds into the hold: all drop and return")
    run.add_argument("--claim", choices=["shared", "per-device"], help="claim certificates")
    run.add_argument("--desired-rate", type=float, help="operator desired changes per second")
    run.add_argument("--endpoint", help="an existing broker (default: start a local one)")
    run.add_argument("--port", type=int, help="its port")
    run.add_argument("--ca-file", type=Path)
    run.add_argument("--claim-certificate", type=Path)
    run.add_argument("--claim-key", type=Path)
    run.add_argument("--timeout", type=float, help="seconds per connect and request")
    run.add_argument(
        "--ceiling-seconds",
        type=float,
        help="first measure bare mutual-TLS connects/s for this long (the onboarding ceiling)",
    )
    run.add_argument(
        "--out",
        type=Path,
        help="report folder (default fleet-sim-<time>): the report, plots and the local broker "
        "side's logs; its PKI and registry stay in a private temporary folder, removed at the end",
    )
    locust_command.add_parser(sub)
    return parser


RUN_OPTIONS = (
    *("devices", "rate", "ramp", "ramp_seconds", "concurrency", "processes"),
    *("devices_per_process", "update_interval", "update_bytes", "hold", "churn", "storm_at"),
    *("claim", "desired_rate", "endpoint", "port", "ca_file", "claim_certificate", "claim_key"),
    *("timeout", "ceiling_seconds"),
)


def cmd_run(args: object, console: Console) -> int:
    import time

    from simulator.run import print_report, run_fleet
    from simulator.scenario import ScenarioError, build

    try:
        scenario = build(args.scenario, {k: getattr(args, k) for k in RUN_OPTIONS})
    except ScenarioError as exc:
        for line in exc.problems:
            print(f"fleet-sim: error: {line}", file=sys.stderr)
        return 2
    out = args.out or Path(f"fleet-sim-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        report = run_fleet(scenario, out, console)
    except (BrokerError, ConfigError, PkiError, ConnectError) as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 1
    print_report(report, console)
    console.print(f"report: {out / 'report.json'}")
    complete = report["devices"]["onboarded"] == scenario.devices
    if report["interrupted"]:
        return children.interrupted_exit_code(1)
    return 0 if complete else 1


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    children.sigterm_like_ctrl_c()
    if args.command == "locust":
        return locust_command.run(args)
    console = Console()
    if args.command == "run":
        try:
            return cmd_run(args, console)
        except KeyboardInterrupt:
            return children.interrupted_exit_code(130)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    problem = demo_problem(args)
    if problem:
        print(f"fleet-sim: error: {problem}", file=sys.stderr)
        return 2
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
    except (BrokerError, ConfigError, PkiError, ConnectError) as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return children.interrupted_exit_code(130)
    try:
        print_report(report, console)
    except BrokenPipeError:  # the reader went away (`| head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        return children.interrupted_exit_code(130)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
