"""``fleet-sim``: run fleets against the local broker side (the simulator grows here)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from broker.config import ConfigError
from broker.mosquitto import BrokerError
from broker.mqtt import ConnectError
from broker.pki import PkiError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="bring up a local fleet cloud, run a small fleet against it, report"
    )
    demo.add_argument("--devices", type=int, default=20, help="fleet size (default 20)")
    demo.add_argument("--dir", type=Path, help="work folder (default: a new temp folder)")
    demo.add_argument("--port", type=int, help="broker port (default: a free one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    if not 2 <= args.devices <= 2000:
        print("fleet-sim: error: --devices must be between 2 and 2000", file=sys.stderr)
        return 2
    from simulator.demo import print_report, run_demo

    try:
        report = run_demo(args.devices, args.dir, args.port, console)
    except (BrokerError, ConfigError, PkiError, ConnectError) as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        print_report(report, console)
    except BrokenPipeError:  # the reader went away (`| head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
