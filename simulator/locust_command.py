"""``fleet-sim locust``: Locust with the fleet's locustfile (simulator/locustfile.py).

Every argument goes to Locust unchanged, after ``-f <locustfile>``, so Locust's own options and
the locustfile's ``--fleet-*`` options all work (``fleet-sim locust --help`` lists both)::

    fleet-sim locust --headless -u 100 -r 20 -t 1m --host mqtts://broker:8883 \\
        --fleet-ca ca.pem --fleet-claim-cert claim.pem --fleet-claim-key claim.key

One argument is ours: ``--local`` starts the local broker side first (Mosquitto + plugin +
services on a free port with a throw-away PKI), fills in ``--host`` and the ``--fleet-ca`` /
``--fleet-claim-*`` options that were not given, and stops it when Locust ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from broker import children

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
#: Where the ``simulator`` package lives: the locustfile imports it by that name.
PACKAGE_ROOT = LOCUSTFILE.parent.parent
LOCAL = "--local"


def add_parser(subparsers: Any) -> None:
    """Add the ``locust`` command to fleet-sim's subparsers."""
    parser = subparsers.add_parser(
        "locust",
        help="load test with Locust: each user is a virtual device "
        "(all options go to locust; --local starts a local broker side first)",
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


def run(args: argparse.Namespace) -> int:
    arguments = [a for a in args.locust_args if a != LOCAL]
    if _given(arguments, "-h", "--help"):
        return show_help(arguments)
    if len(arguments) == len(args.locust_args):
        return run_locust(arguments)
    if _given(arguments, "--worker"):
        print(
            "fleet-sim: error: --local starts a broker side for this machine's run; a --worker "
            "gets its broker from the master",
            file=sys.stderr,
        )
        return 2
    from broker.config import ConfigError
    from broker.mosquitto import BrokerError
    from broker.pki import PkiError

    try:
        with local_broker_side() as local:
            for flags, value in local.items():
                if not _given(arguments, *flags):
                    arguments += [flags[0], value]
            return run_locust(arguments)
    except (BrokerError, ConfigError, PkiError) as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while the broker side starts or stops (it is stopped)
        return children.interrupted_exit_code(130)


@contextlib.contextmanager
def local_broker_side() -> Iterator[dict[tuple[str, ...], str]]:
    """A broker side on a free loopback port, and the options that point Locust at it."""
    from broker import bootstrap
    from broker.config import load_config
    from broker.mosquitto import free_port
    from broker.stack import Stack

    folder = Path(tempfile.mkdtemp(prefix="fleet-locust-"))
    try:
        folder.chmod(0o755)  # as root, Mosquitto drops to its own user, which must reach the PKI
        pki = bootstrap.initialize(folder / "certs")
        config = load_config(pki.root, port=free_port(), bind_address="127.0.0.1")
        stack = Stack(config, with_services=True)
        print(f"fleet-sim: local broker side on 127.0.0.1:{config.port} ({folder})", flush=True)
        stack.start()
        try:
            yield {
                ("--host", "-H"): f"mqtts://127.0.0.1:{config.port}",
                ("--fleet-ca",): str(pki.ca_cert),
                ("--fleet-claim-cert",): str(pki.claim_cert),
                ("--fleet-claim-key",): str(pki.claim_key),
            }
        finally:
            stack.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _environment() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), path]))}


def show_help(arguments: Sequence[str]) -> int:
    """Locust's help, then the locustfile's options (Locust's --help leaves them out)."""
    code = run_locust(arguments)
    sys.stdout.flush()
    script = "from simulator.locustfile import options_help; print(options_help())"
    subprocess.run([sys.executable, "-c", script], env=_environment(), check=False)
    print(f"{LOCAL}  start a local broker side first and point --host and --fleet-* at it")
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
