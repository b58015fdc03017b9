"""``fleet-sim locust``: Locust with the fleet's locustfile (simulator/locustfile.py).

Every argument goes to Locust unchanged, after ``-f <locustfile>``, so Locust's own options and
the locustfile's ``--fleet-*`` options all work (``fleet-sim locust --help`` lists both)::

    fleet-sim locust --headless -u 100 -r 20 -t 1m --host mqtts://broker:8883 \\
        --fleet-ca ca.pem --fleet-claim-cert claim.pem --fleet-claim-key claim.key

Two arguments are ours: ``--local`` starts the local broker side first (Mosquitto + plugin +
services on a free port with a throw-away PKI), fills in ``--host`` and the ``--fleet-ca`` /
``--fleet-claim-*`` options that were not given, and stops it when Locust ends; its folder is
removed then, unless ``--keep`` is given or the run failed (the logs say why).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import children

if TYPE_CHECKING:
    pass

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
#: Where the ``simulator`` package lives: the locustfile imports it by that name.
PACKAGE_ROOT = LOCUSTFILE.parent.parent
LOCAL = "--local"
KEEP = "--keep"
OURS = (LOCAL, KEEP)
#: Exit codes that are no failure of the run: done, bad options (nothing ran), stopped.
NOT_FAILED = (0, 2, 130, 143)
HELP = f"""\
fleet-sim locust: fleet-sim's wrapper around Locust, with the fleet's locustfile
({LOCUSTFILE.name}: every Locust user is a virtual device). Every argument goes to Locust, so
all of Locust's options below work, and the locustfile's --fleet-* options after them.

fleet-sim's own options:
  {LOCAL}   start a local broker side first (free port, throw-away PKI) and point --host and
            the --fleet-ca/--fleet-claim-* options that were not given at it
  {KEEP}    with {LOCAL}: keep the broker side's folder (PKI, registry, the Mosquitto and
            services logs) instead of removing it at the end; a failed run keeps it anyway

exit codes: Locust's (0 done, 1 the run had failures, 2 bad options), 1 the local broker side
could not start, 130 Ctrl-C, 143 SIGTERM.

example:
  fleet-sim locust {LOCAL} --headless -u 200 -r 50 -t 2m --csv results/run

Locust's help follows.
"""


def add_parser(subparsers: Any) -> None:
    """Add the ``locust`` command to fleet-sim's subparsers."""
    parser = subparsers.add_parser(
        "locust",
        help="load test with Locust: each user is a virtual device (all options go to "
        "Locust; --local starts a local broker side first, --keep keeps its folder)",
        description=__doc__.split("\n\n")[0],
        # No option of its own for argparse: everything, -h included, is Locust's.
        prefix_chars="\0",
        add_help=False,
    )
    parser.add_argument("locust_args", nargs="*", metavar="LOCUST_ARGUMENT")


def locust_command() -> list[str]:
    """Locust of this Python environment (beside the interpreter), never one found on PATH."""
    script = Path(sys.executable).with_name("locust")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "locust"]


def _given(arguments: Sequence[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in arguments for f in flags)


def _usage_error(message: str) -> int:
    print(f"fleet-sim: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    arguments = [a for a in args.locust_args if a not in OURS]
    if _given(arguments, "-h", "--help"):
        return show_help(arguments)
    local, keep = LOCAL in args.locust_args, KEEP in args.locust_args
    if not local:
        return _usage_error(f"{KEEP} applies only with {LOCAL}") if keep else run_locust(arguments)
    if _given(arguments, "--worker"):
        return _usage_error(
            f"{LOCAL} starts a broker side for this machine's run; a --worker gets its broker "
            "from the master"
        )
    from broker.config import ConfigError
    from broker.mosquitto import BrokerError
    from broker.pki import PkiError

    try:
        with local_broker_side(keep=keep) as side:
            for flags, value in side.options.items():
                if not _given(arguments, *flags):
                    arguments += [flags[0], value]
            code = run_locust(arguments)
            side.failed = code not in NOT_FAILED
            return code
    except ConfigError as exc:
        return _usage_error(str(exc))
    except (BrokerError, PkiError) as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while the broker side starts or stops (it is stopped)
        return children.interrupted_exit_code(130)


@dataclass
class LocalSide:
    """The local broker side of a run: the options that point Locust at it, its folder, and
    whether to keep that folder at the end (asked for, or the run failed)."""

    folder: Path
    options: dict[tuple[str, ...], str]
    keep: bool = False
    failed: bool = False


@contextlib.contextmanager
def local_broker_side(*, keep: bool = False) -> Iterator[LocalSide]:
    """A broker side on a free loopback port (broker.local), stopped at the end; its folder
    is removed then unless ``keep`` or the run failed (set ``failed``), or it could not
    start."""
    from broker import local

    side = LocalSide(Path(), {}, keep=keep)

    def announce(broker: local.LocalBrokerSide) -> None:
        side.folder = broker.folder
        print(
            f"fleet-sim: local broker side on {local.HOST}:{broker.config.port} ({broker.folder})",
            flush=True,
        )
        side.options = {
            ("--host", "-H"): f"mqtts://{local.HOST}:{broker.config.port}",
            ("--fleet-ca",): str(broker.pki.ca_cert),
            ("--fleet-claim-cert",): str(broker.pki.claim_cert),
            ("--fleet-claim-key",): str(broker.pki.claim_key),
        }

    def keep_or_remove(broker: local.LocalBrokerSide) -> None:
        side.failed = side.failed or broker.failed
        broker.keep = side.keep or side.failed
        if broker.keep:
            why = "the run failed; " if side.failed and not side.keep else ""
            print(
                f"fleet-sim: {why}kept the broker side's folder {broker.folder} (logs: "
                f"{broker.files.log}, {broker.files.services_log}; remove it when done)",
                flush=True,
            )

    with local.local_broker_side("fleet-locust-", announce=announce, on_exit=keep_or_remove):
        yield side


def _environment() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), path]))}


def show_help(arguments: Sequence[str]) -> int:
    """Ours first (what this is, --local, --keep), then Locust's help, then the locustfile's
    options (Locust's --help leaves them out)."""
    print(HELP, flush=True)
    code = run_locust(arguments)
    sys.stdout.flush()
    script = (  # quiet when the reader has gone (| head), as Locust's own help is
        "import os, sys\nfrom simulator.locustfile import options_help\n"
        "try:\n    print(options_help(), flush=True)\n"
        "except BrokenPipeError:\n    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n"
    )
    subprocess.run([sys.executable, "-c", script], env=_environment(), check=False)
    return code


def run_locust(arguments: Sequence[str]) -> int:
    """Locust with the fleet's locustfile, to its end; its exit code (143 when we were stopped
    by SIGTERM, which Locust gets too and stops on as it does on Ctrl-C)."""
    command = [*locust_command(), "-f", str(LOCUSTFILE), *arguments]
    # In our process group, so a terminal's Ctrl-C reaches it (and its keyboard input works);
    # SIGTERM from the kernel if we die without stopping it.
    process = subprocess.Popen(
        command, env=_environment(), preexec_fn=children.preexec(signal.SIGTERM)
    )
    try:
        code = process.wait()
    except KeyboardInterrupt:  # Locust got the same Ctrl-C: let it stop and report
        if children.stopped_by_sigterm():  # sent to us alone (kill PID): pass it on
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.kill()
            code = process.wait()
    if children.stopped_by_sigterm():
        return children.interrupted_exit_code(code)
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-sim")
    add_parser(parser.add_subparsers(dest="command", required=True))
    children.sigterm_like_ctrl_c()
    return run(parser.parse_args(["locust", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
