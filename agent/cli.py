"""``fleet-agent``: the device-side command line.

``fleet-agent provision --config agent.toml`` onboards the device by claim and prints one line.
Failures print one line on stderr naming the cause, never a traceback, a token or a key.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Final

from agent.config import DEFAULT_CONFIG, AgentConfig, ConfigError, claim_file_problems, load_config
from agent.keystore import Keystore, KeystoreError, remove_durably
from agent.onboarding import ClaimSettings, OnboardingFailed, onboard
from agent.provisioning import RetryPolicy
from agent.session import SessionError, tls_context

PROG: Final = "fleet-agent"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # permanent: refused, rejected, bad state
EXIT_USAGE: Final = 2  # command line or configuration
EXIT_TRANSIENT: Final = 3  # unreachable, timeout, lost connection, 5xx: try again later
EXIT_INTERNAL: Final = 70
EXIT_INTERRUPTED: Final = 130

log = logging.getLogger("fleet.agent")


class Failure(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The mqtt-fleet device agent: onboarding by claim (AWS IoT Fleet "
        "Provisioning MQTT API) against AWS IoT Core or the local broker side.",
        epilog=f"exit codes: {EXIT_OK} success, {EXIT_FAILED} refused or rejected, "
        f"{EXIT_USAGE} bad command line or config, {EXIT_TRANSIENT} broker unreachable or "
        "timeout (try again later)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    provision = commands.add_parser(
        "provision",
        help="get this device its own certificate and thing, using the claim certificate",
        description="Make a key pair here, send a CSR with the claim certificate, register "
        "a thing through the provisioning template, store the key, certificate and record in "
        "the state folder, then reconnect with the new certificate to prove it works.",
    )
    provision.add_argument(
        "--config",
        type=str,
        default=str(DEFAULT_CONFIG),
        metavar="PATH",
        help=f"agent configuration (default {DEFAULT_CONFIG})",
    )
    provision.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set broker.port=8884 or "
        "--set provisioning.parameters.SerialNumber=SN-1 (repeatable)",
    )
    provision.add_argument(
        "--force",
        action="store_true",
        help="provision again even if the state folder holds working credentials",
    )
    return parser


def _settings(config: AgentConfig) -> ClaimSettings:
    try:
        context = tls_context(config.broker.ca_file, config.claim.certificate, config.claim.key)
    except SessionError as exc:
        raise Failure(f"{config.path}: {exc}", EXIT_USAGE) from None
    p = config.provisioning
    return ClaimSettings(
        endpoint=config.broker.endpoint,
        port=config.broker.port,
        ca_file=config.broker.ca_file,
        claim_context=context,
        template=p.template,
        parameters=dict(p.parameters),
        key_type=p.key_type,
        common_name=p.common_name,
        timeout=p.timeout,
        retry=RetryPolicy(max_attempts=p.max_attempts),
    )


def cmd_provision(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides, check_claim_files=False)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    logging.getLogger().setLevel(config.agent.log_level.upper())
    keystore = Keystore(config.agent.state_dir)

    if not args.force:
        try:
            existing = keystore.provisioned()
        except KeystoreError as exc:
            raise Failure(f"state folder {keystore.root} is inconsistent: {exc}") from None
        if existing is not None:
            record = existing.record
            print(
                f"already provisioned as thing {record.thing_name} (certificate "
                f"{record.certificate_id[:12]}…) in {keystore.root}; --force provisions again"
            )
            return EXIT_OK

    problems = claim_file_problems(config.path, config.claim.certificate, config.claim.key)
    if problems:
        raise Failure("\n".join(problems), EXIT_USAGE)
    settings = _settings(config)
    try:
        done = asyncio.run(onboard(settings, keystore))
    except OnboardingFailed as exc:
        raise Failure(str(exc), EXIT_TRANSIENT if exc.transient else EXIT_FAILED) from None

    print(
        f"provisioned thing {done.result.thing_name} (certificate "
        f"{done.result.certificate_id[:12]}…) in {done.seconds:.2f} s"
    )
    if config.claim.remove_after_provisioning:
        for path in (config.claim.key, config.claim.certificate):
            try:
                remove_durably(path)
            except OSError as exc:
                print(
                    f"{PROG}: warning: could not remove the claim file {path}: {exc.strerror}",
                    file=sys.stderr,
                )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s", stream=sys.stderr
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return cmd_provision(args)
    except Failure as failure:
        for line in str(failure).splitlines():
            print(f"{PROG}: {line}", file=sys.stderr)
        return failure.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        log.debug("internal error", exc_info=True)
        print(
            f"{PROG}: internal error ({type(exc).__name__}); run with "
            "--set agent.log_level=debug for details",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
