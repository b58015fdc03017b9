"""``fleet-agent``: the device-side command line.

``fleet-agent provision --config agent.toml`` onboards the device by claim and prints one line.
Failures print one line on stderr naming the cause, never a traceback, a token or a key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Final

from agent import config_show, control, distribution_version, logs, wire
from agent.config import (
    DEFAULT_CONFIG,
    AgentConfig,
    ConfigError,
    claim_file_problems,
    effective_settings,
    load_config,
)
from agent.device import (
    Device,
    SetupError,
    handler_registry,
    one_shot,
    renew_once,
    serve_device,
)
from agent.durable import remove_durably
from agent.instance import AlreadyRunning, InstanceLock
from agent.keystore import Keystore, KeystoreError, Provisioned
from agent.onboarding import ClaimSettings, OnboardingFailed, onboard, prove_certificate
from agent.provisioning import RetryPolicy
from agent.reconnect import Backoff
from agent.renewal import RenewalFailed, obtained_at, renewal_time
from agent.runtime import CertificateUnusable
from agent.session import (
    BrokerUnreachable,
    ConnectRefused,
    SessionError,
    SessionTimeout,
    tls_context,
)
from agent.shadow import ReportQueueFull
from agent.shadow_sync import ShadowRejected, ShadowSync
from agent.systemd import Notifier, watchdog_loop

PROG: Final = "fleet-agent"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # permanent: refused, rejected, bad state
EXIT_USAGE: Final = 2  # command line or configuration
EXIT_TRANSIENT: Final = 3  # unreachable, timeout, lost connection, 5xx: try again later
EXIT_REVOKED: Final = 4  # the device certificate is revoked: re-provision or replace it
EXIT_INTERNAL: Final = 70
EXIT_INTERRUPTED: Final = 130

log = logging.getLogger("fleet.agent")


class Failure(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """--config and --set, before the command (``top``: with the defaults) or after it: a
    --config there wins (SUPPRESS keeps the one before when there is none), --set adds up."""
    parser.add_argument(
        "--config",
        type=str,
        default=str(DEFAULT_CONFIG) if top else argparse.SUPPRESS,
        metavar="PATH",
        help=f"agent configuration (default {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--set",
        dest="overrides" if top else "overrides_after",
        action="append",
        default=[] if top else argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set broker.port=8884 or "
        "--set provisioning.parameters.SerialNumber=SN-1 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The mqtt-fleet device agent: onboarding by claim (AWS IoT Fleet "
        "Provisioning MQTT API) and Device Shadow sync, against AWS IoT Core or the local "
        "broker side.",
        epilog=f"exit codes: {EXIT_OK} success, {EXIT_FAILED} refused or rejected, "
        f"{EXIT_USAGE} bad command line or config, {EXIT_TRANSIENT} broker unreachable or "
        f"timeout (try again later), {EXIT_REVOKED} the device certificate is revoked",
    )
    _common(parser, top=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {distribution_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    provision = commands.add_parser(
        "provision",
        help="get this device its own certificate and thing, using the claim certificate",
        description="Make a key pair here, send a CSR with the claim certificate, register "
        "a thing through the provisioning template, store the key, certificate and record in "
        "the state folder, then reconnect with the new certificate to prove it works.",
    )
    _common(provision)
    provision.add_argument(
        "--force",
        action="store_true",
        help="provision again even if the state folder holds working credentials",
    )
    run = commands.add_parser(
        "run",
        help="run the agent: provision if needed, then keep the shadows in sync",
        description="Onboard on first start, then stay connected with the device's own "
        "certificate: apply desired state through the handlers, report device facts and "
        "handler results, queue reports on disk while offline, reconnect with backoff. "
        "Stops on SIGTERM or Ctrl-C.",
    )
    _common(run)
    status = commands.add_parser(
        "status",
        help="thing, certificate and its expiry, connection state, last shadow sync",
        description="Asks the running agent; without one, reports what the state folder holds.",
    )
    _common(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    config = commands.add_parser(
        "config",
        help="check the configuration without connecting",
        description="Validate agent.toml (every problem, one line each), the files it names, "
        "the handler plugins and hook, and the state folder's credentials.",
    )
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION")
    config_commands.required = True
    _common(config_commands.add_parser("check", help="validate agent.toml and the state folder"))
    _common(
        config_commands.add_parser(
            "show",
            help="print every setting in use, defaults and --set included, as agent.toml",
            description="Print the settings the agent uses, as TOML it reads back: the "
            "file's values, --set overrides applied, and every default marked '# default'.",
        )
    )
    cert = commands.add_parser(
        "cert",
        help="show the device certificate: thing, id, subject, issuer, validity, key",
        description="Show the certificate the device holds (no secret: the key stays put).",
    )
    _common(cert)
    cert.add_argument("--json", action="store_true", help="print one JSON object")
    connect = commands.add_parser(
        "connect",
        help="prove the provisioned identity works: connect as the thing once, and leave",
        description="Connect with the device's own certificate as its thing, subscribe to "
        "its shadow delta and disconnect; say how long it took, or why it failed. With an "
        "agent running, ask it instead (a second connection would take its session).",
    )
    _common(connect)
    renew = commands.add_parser(
        "renew",
        help="renew the device certificate now (through the running agent if any)",
        description="A new key and CSR, a certificate for the same thing requested with the "
        "current one, a test connection with it, then the switch; the old certificate is kept "
        "until the new one has connected, and the broker then retires it.",
    )
    _common(renew)
    renew.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the running agent to finish it (default 60)",
    )
    shadow = commands.add_parser(
        "shadow",
        help="read this device's shadow or report state (through the running agent if any)",
        description="While `fleet-agent run` is running these go through it (one connection "
        "per thing); otherwise they connect once themselves.",
    )
    shadow_commands = shadow.add_subparsers(dest="shadow_command", metavar="ACTION")
    shadow_commands.required = True
    get = shadow_commands.add_parser("get", help="print the shadow document")
    report = shadow_commands.add_parser(
        "report",
        help="report state: key=value ... (JSON values; dotted keys nest; null deletes)",
    )
    report.add_argument("assignments", nargs="+", metavar="key=value")
    report.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the service to accept it (default 10)",
    )
    for sub in (get, report):
        _common(sub)
        sub.add_argument("--name", help="a named shadow (default: the classic shadow)")
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
    config, keystore = _load(args)

    if not args.force:
        try:
            existing = keystore.provisioned()
        except KeystoreError as exc:
            raise Failure(f"state folder {keystore.root}: {exc}", EXIT_USAGE) from None
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
    _remove_claim_if_configured(config)
    return EXIT_OK


def _load(args: argparse.Namespace) -> tuple[AgentConfig, Keystore]:
    try:
        config = load_config(args.config, args.overrides, check_claim_files=False)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    level = config.agent.log_level
    if args.command != "run" and level == "info":
        # The daemon says what it does (connected as X, renewed, ...); a one-shot command
        # says it in its own output, and its stderr stays one line per problem.
        level = "warning"
    logging.getLogger().setLevel(level.upper())
    return config, Keystore(config.agent.state_dir)


def _provisioned(keystore: Keystore, *, create: bool = True) -> Provisioned | None:
    """The stored credentials; ``create=False`` only reads (no state folder: None)."""
    try:
        if create:
            keystore.ensure()
        elif not keystore.root.exists():
            return None
        return keystore.provisioned()
    except KeystoreError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None


async def _onboard_until_done(
    config: AgentConfig, keystore: Keystore, stop: asyncio.Event
) -> Provisioned | None:
    """First boot: onboard by claim, retrying transient failures with backoff until ``stop``."""
    problems = claim_file_problems(config.path, config.claim.certificate, config.claim.key)
    if problems:
        raise Failure("\n".join(problems), EXIT_USAGE)
    settings = _settings(config)
    backoff = Backoff()
    while not stop.is_set():
        try:
            done = await onboard(settings, keystore)
        except OnboardingFailed as exc:
            if exc.error_code == "InvalidParameters":
                # The template wants parameters this config does not give: only an edit helps.
                raise Failure(
                    f"{exc}; set them under [provisioning.parameters] in {config.path}",
                    EXIT_USAGE,
                ) from None
            if exc.transient:
                delay = backoff.failed("transient")
                log.warning("onboarding failed (%s); trying again in %.1f s", exc, delay)
            else:
                # Refused for now (a hook's allow-list, a revoked thing, a template): an
                # operator may fix it, so try again, but minutes apart, not at systemd's 5 s.
                delay = backoff.failed("identity")
                log.error("onboarding refused (%s); trying again in %.0f s", exc, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        log.info(
            "provisioned thing %s (certificate %s…)",
            done.result.thing_name,
            done.result.certificate_id[:12],
        )
        _remove_claim_if_configured(config)
        return keystore.provisioned()
    return None


def _remove_claim_if_configured(config: AgentConfig) -> None:
    if not config.claim.remove_after_provisioning:
        return
    for path in (config.claim.key, config.claim.certificate):
        try:
            remove_durably(path)
        except OSError as exc:
            print(
                f"{PROG}: warning: could not remove the claim file {path}: {exc.strerror}",
                file=sys.stderr,
            )


def cmd_run(args: argparse.Namespace) -> int:
    config, keystore = _load(args)
    _provisioned(keystore)  # creates the folder; refuses a key readable by others
    lock = InstanceLock(keystore.root)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        raise Failure(str(exc), EXIT_FAILED) from None

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # Under systemd (Type=notify): the event loop itself pings the watchdog, so a wedged
        # agent is restarted.
        notifier = Notifier.from_environment()
        watchdog = asyncio.create_task(watchdog_loop(notifier, lambda: True)) if notifier else None
        try:
            provisioned = keystore.provisioned()
            if provisioned is None:
                if notifier:
                    notifier.ready("onboarding by claim")
                provisioned = await _onboard_until_done(config, keystore, stop)
            if provisioned is None:
                return EXIT_OK
            if notifier:
                notifier.ready(f"running as thing {provisioned.record.thing_name}")
            device = Device(config, keystore, provisioned)
            try:
                await serve_device(device, stop)
            except SetupError as exc:
                raise Failure(str(exc), EXIT_USAGE) from None
            return EXIT_OK
        finally:
            if notifier:
                notifier.stopping()
            if watchdog:
                watchdog.cancel()

    try:
        return asyncio.run(main())
    except CertificateUnusable as exc:
        record = keystore.load_record()
        if record is not None:
            with contextlib.suppress(OSError):
                keystore.record_refusal(record.certificate_id, str(exc))
        raise Failure(
            f"{exc}; this device must be provisioned again (fleet-agent provision --force) "
            "or given a new certificate",
            EXIT_REVOKED,
        ) from None
    finally:
        lock.release()


def _require_provisioned(config: AgentConfig, keystore: Keystore) -> Provisioned:
    provisioned = _provisioned(keystore)
    if provisioned is None:
        raise Failure(
            f"this device is not provisioned yet (no credentials in {keystore.root}); run "
            f"{PROG} provision or {PROG} run first",
            EXIT_USAGE,
        )
    return provisioned


def cmd_cert(args: argparse.Namespace) -> int:
    config, keystore = _load(args)
    provisioned = _require_provisioned(config, keystore)
    certificate = keystore.load_certificate()
    key = certificate.public_key()
    size = getattr(key, "key_size", None)
    curve = getattr(getattr(key, "curve", None), "name", None)
    report = {
        "thing": provisioned.record.thing_name,
        "certificate_id": provisioned.record.certificate_id,
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serial": format(certificate.serial_number, "x"),
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "public_key": f"EC {curve}" if curve else f"RSA {size}",
        "file": str(provisioned.cert_path),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    for name, value in report.items():
        print(f"{name.replace('_', ' '):<15} {value}")
    return EXIT_OK


def cmd_connect(args: argparse.Namespace) -> int:
    config, keystore = _load(args)
    provisioned = _require_provisioned(config, keystore)
    thing = provisioned.record.thing_name
    where = f"{config.broker.endpoint}:{config.broker.port}"
    if InstanceLock(keystore.root).held_elsewhere():
        try:
            status = control.call(config.agent.socket_path, {"op": "status"})["status"]
        except control.ControlError as exc:
            raise Failure(f"an agent runs here but does not answer: {exc}", EXIT_FAILED) from None
        if status.get("state") != "connected":
            raise Failure(
                f"the running agent is {status.get('state')}: {status.get('last_error') or '?'}",
                EXIT_TRANSIENT,
            )
        print(f"the running agent is connected to {where} as thing {thing}")
        return EXIT_OK
    try:
        context = tls_context(config.broker.ca_file, provisioned.cert_path, provisioned.key_path)
        started = time.monotonic()
        asyncio.run(
            prove_certificate(
                config.broker.endpoint,
                config.broker.port,
                context,
                thing,
                config.provisioning.timeout,
            )
        )
    except ConnectRefused as exc:
        code = EXIT_REVOKED if exc.identity_refused else EXIT_TRANSIENT
        raise Failure(f"{where} refused thing {thing}'s certificate: {exc}", code) from None
    except (BrokerUnreachable, SessionTimeout) as exc:
        raise Failure(str(exc), EXIT_TRANSIENT) from None
    except SessionError as exc:
        raise Failure(str(exc), EXIT_FAILED) from None
    elapsed = (time.monotonic() - started) * 1000
    print(
        f"connected to {where} as thing {thing} with certificate "
        f"{provisioned.record.certificate_id[:12]}… and subscribed to its shadow in "
        f"{elapsed:.0f} ms"
    )
    return EXIT_OK


def cmd_renew(args: argparse.Namespace) -> int:
    config, keystore = _load(args)
    provisioned = _require_provisioned(config, keystore)
    old = provisioned.record.certificate_id
    lock = InstanceLock(keystore.root)
    if lock.held_elsewhere():
        try:
            control.call(
                config.agent.socket_path,
                {"op": "renew", "wait": args.wait},
                timeout=args.wait + 10,
            )
        except control.ControlError as exc:
            raise Failure(f"running agent: {exc}", EXIT_FAILED) from None
    else:
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            raise Failure(f"{exc}; try again", EXIT_TRANSIENT) from None
        try:
            asyncio.run(renew_once(Device(config, keystore, provisioned)))
        except RenewalFailed as exc:
            raise Failure(f"renewal failed: {exc}", EXIT_FAILED) from None
        except SessionError as exc:
            raise Failure(
                f"cannot connect with the current certificate: {exc}", EXIT_TRANSIENT
            ) from None
        finally:
            lock.release()
    renewed = keystore.provisioned()
    assert renewed is not None
    expires = keystore.load_certificate().not_valid_after_utc.isoformat()
    print(
        f"renewed the certificate of thing {renewed.record.thing_name}: now "
        f"{renewed.record.certificate_id[:12]}…, valid until {expires}; the broker retires "
        f"{old[:12]}…"
    )
    return EXIT_OK


def cmd_shadow(args: argparse.Namespace) -> int:
    config, keystore = _load(args)
    provisioned = _require_provisioned(config, keystore)
    shadow = args.name
    if shadow is not None and shadow not in config.shadow.names:
        config = dataclasses.replace(
            config,
            shadow=dataclasses.replace(config.shadow, names=(*config.shadow.names, shadow)),
        )
    patch: dict[str, object] = {}
    if args.shadow_command == "report":
        try:
            patch = wire.state_from_assignments(args.assignments)
        except ValueError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None

    lock = InstanceLock(keystore.root)
    if lock.held_elsewhere():
        return _shadow_via_daemon(config, args, shadow, patch)
    try:
        lock.acquire()
    except AlreadyRunning:  # started meanwhile
        return _shadow_via_daemon(config, args, shadow, patch)
    try:
        return _shadow_one_shot(Device(config, keystore, provisioned), args, shadow, patch)
    finally:
        lock.release()


def _print_shadow(document: object, shadow: str | None) -> int:
    if document is None:
        print(f"{PROG}: shadow {shadow or 'classic'} does not exist yet", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(document, indent=2, sort_keys=True))
    return EXIT_OK


def _shadow_via_daemon(
    config: AgentConfig, args: argparse.Namespace, shadow: str | None, patch: dict[str, object]
) -> int:
    socket_path = config.agent.socket_path
    request: dict[str, object] = {"op": args.shadow_command, "shadow": shadow}
    if args.shadow_command == "report":
        request.update(patch=patch, wait=args.wait)
    try:
        wait = getattr(args, "wait", 10.0)
        answer = control.call(socket_path, request, timeout=max(30.0, wait + 5))
    except control.ControlError as exc:
        code = EXIT_FAILED if exc.permanent else EXIT_TRANSIENT
        raise Failure(f"running agent: {exc}", code) from None
    if args.shadow_command == "get":
        return _print_shadow(answer.get("document"), shadow)
    return _report_outcome(
        answer.get("changed"), answer.get("sent"), answer.get("version"), answer.get("rejected")
    )


def _report_outcome(changed: object, sent: object, version: object, rejected: object = None) -> int:
    if isinstance(rejected, dict):
        raise Failure(
            f"the shadow service rejected the report: {rejected.get('code')} "
            f"{rejected.get('message')} (kept in the state folder's shadows/*.rejected.jsonl)",
            EXIT_FAILED,
        )
    if not changed:
        print("nothing to report: the shadow already says so")
        return EXIT_OK
    if sent:
        print(f"reported (shadow version {version})")
        return EXIT_OK
    print(
        f"{PROG}: saved in the report queue but not accepted yet; the agent sends it when "
        "the broker is reachable",
        file=sys.stderr,
    )
    return EXIT_TRANSIENT


def _shadow_one_shot(
    device: Device, args: argparse.Namespace, shadow: str | None, patch: dict[str, object]
) -> int:
    async def get(sync: ShadowSync) -> object:
        return await sync.refresh()

    async def enqueue() -> bool:
        """Queue the patch (a no-op one is dropped); True if the queue holds reports to send."""
        sync = device.shadow_sync(shadow)
        await sync.report(patch)
        return bool(sync.queue)

    async def report(sync: ShadowSync) -> tuple[bool, bool, int | None, object]:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(sync.send_queued(), args.wait)
        sent = not sync.queue
        changed, rejected = True, None
        if sync.rejections:
            rejected = {"code": sync.rejections[-1].code, "message": sync.rejections[-1].message}
        return changed, sent, sync.tracker.version, rejected

    try:
        if args.shadow_command == "get":
            return _print_shadow(asyncio.run(one_shot(device, shadow, get)), shadow)
        pending = asyncio.run(enqueue())  # on disk before any connection is tried
        if not pending:
            return _report_outcome(False, True, None)
        return _report_outcome(*asyncio.run(one_shot(device, shadow, report)))
    except SessionError as exc:
        if args.shadow_command == "report":
            # The report is in the queue on disk already: nothing is lost.
            print(
                f"{PROG}: saved in the report queue; not sent: {exc}; `{PROG} run` sends it "
                "when the broker is reachable",
                file=sys.stderr,
            )
            return EXIT_TRANSIENT
        raise Failure(str(exc), EXIT_TRANSIENT) from None
    except ShadowRejected as exc:
        raise Failure(str(exc), EXIT_FAILED) from None
    except ReportQueueFull as exc:
        raise Failure(
            f"{exc}; `{PROG} run` sends the queue when the broker is reachable", EXIT_TRANSIENT
        ) from None


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "show":
        return cmd_config_show(args)
    return cmd_config_check(args)


def cmd_config_show(args: argparse.Namespace) -> int:
    _load(args)  # every problem first, one line each, as `config check` says them
    values, defaults = effective_settings(args.config, args.overrides)
    print(f"# {args.config} as fleet-agent {distribution_version()} reads it")
    print(config_show.render(values, defaults), end="")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    config, keystore = _load(args)
    provisioned = _provisioned(keystore, create=False)
    if provisioned is None:
        problems = claim_file_problems(config.path, config.claim.certificate, config.claim.key)
        if problems:
            raise Failure("\n".join(problems), EXIT_USAGE)
    try:
        registry = handler_registry(config)
    except SetupError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    identity = (
        f"thing {provisioned.record.thing_name}"
        if provisioned
        else f"not provisioned yet (claim {config.claim.certificate})"
    )
    shadows = ", ".join(s or "classic" for s in config.shadow.shadows)
    handled = ", ".join(s or "classic" for s in registry.shadows()) or "none"
    print(f"{config.path}: OK")
    print(f"  broker   {config.broker.endpoint}:{config.broker.port} (CA {config.broker.ca_file})")
    print(f"  device   {identity}; state in {keystore.root}")
    print(f"  control  socket {config.agent.socket_path}")
    print(
        f"  shadows  {shadows}; handlers on: {handled}; unhandled keys: {config.shadow.unhandled}"
    )
    return EXIT_OK


def _ago(stamp: object) -> str:
    if not isinstance(stamp, int | float):
        return "never"
    return f"{max(0, int(time.time() - stamp))} s ago"


def cmd_status(args: argparse.Namespace) -> int:
    config, keystore = _load(args)
    provisioned = _provisioned(keystore, create=False)
    report: dict[str, object] = {
        "state_dir": str(keystore.root),
        "control_socket": str(config.agent.socket_path),
        "provisioned": False,
    }
    if provisioned is not None:
        certificate = keystore.load_certificate()
        report.update(
            provisioned=True,
            thing=provisioned.record.thing_name,
            certificate_id=provisioned.record.certificate_id,
            certificate_expires=certificate.not_valid_after_utc.isoformat(),
        )
        refused = keystore.refusal()
        if refused is not None:
            report["certificate_refused"] = refused
        if config.renewal.enabled and refused is None:
            renew_at = renewal_time(
                certificate,
                config.renewal.share,
                obtained_at=obtained_at(provisioned.record),
                min_age=config.renewal.min_age,
            )
            report["renewal_due"] = renew_at.isoformat()
    lock = InstanceLock(keystore.root)
    running = keystore.root.exists() and lock.held_elsewhere()
    report["agent"] = "running" if running else "not running"
    if running:
        try:
            report["runtime"] = control.call(config.agent.socket_path, {"op": "status"})["status"]
        except control.ControlError as exc:
            report["runtime_error"] = str(exc)
    else:
        queued = sorted((keystore.root / "shadows").glob("*.pending.json"))
        report["queued_report_files"] = [p.name for p in queued]
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return EXIT_OK
    if provisioned is None:
        print(f"not provisioned (state folder {keystore.root})")
    else:
        print(f"thing        {report['thing']}")
        certificate_id = str(report["certificate_id"])[:12]
        print(f"certificate  {certificate_id}… expires {report['certificate_expires']}")
        refusal = report.get("certificate_refused")
        if isinstance(refusal, dict):
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(refusal.get("at", 0)))
            print(f"             REFUSED by the broker at {at}: {refusal.get('reason')}")
            print("             provision again: fleet-agent provision --force")
        else:
            due = report.get("renewal_due")
            print(f"renewal      {'due ' + str(due) if due else 'off (renewal.enabled = false)'}")
    runtime = report.get("runtime")
    if isinstance(runtime, dict):
        since = runtime.get("connected_since")
        lasted = (
            f" for {max(0, int(time.time() - since))} s" if isinstance(since, int | float) else ""
        )
        state = f"{runtime.get('state')}{lasted}"
        print(f"agent        running, {state}")
        if runtime.get("last_error"):
            print(f"last error   {runtime['last_error']}")
        renewal = runtime.get("certificate") or {}
        if renewal.get("last_error"):
            retry = renewal.get("renew_at")
            when = f"; next attempt in {max(0, int(retry - time.time()))} s" if retry else ""
            print(
                f"renewal      {renewal.get('failures')} failed attempt(s): "
                f"{renewal['last_error']}{when}"
            )
        for name, shadow in (runtime.get("shadows") or {}).items():
            print(
                f"shadow {name:<6} version {shadow.get('version')}, last sync "
                f"{_ago(shadow.get('last_sync'))}, {shadow.get('queued_reports')} queued report(s)"
            )
    else:
        print(f"agent        {report['agent']}")
        if report.get("runtime_error"):
            print(f"             {report['runtime_error']}")
        queued_files = report.get("queued_report_files")
        for name in queued_files if isinstance(queued_files, list) else []:
            print(f"queued       {name} (sent on the next connection)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure("warning", program=PROG)  # one line per record, secrets redacted
    logging.captureWarnings(True)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.overrides = [*args.overrides, *getattr(args, "overrides_after", [])]
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    commands = {
        "provision": cmd_provision,
        "run": cmd_run,
        "shadow": cmd_shadow,
        "status": cmd_status,
        "config": cmd_config,
        "renew": cmd_renew,
        "connect": cmd_connect,
        "cert": cmd_cert,
    }
    try:
        return commands[args.command](args)
    except Failure as failure:
        for line in str(failure).splitlines():
            print(f"{PROG}: {line}", file=sys.stderr)
        return failure.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PermissionError as exc:
        # Typically a file root made in the agent's state folder (a command run as root):
        # name it and the fix; exit 2, so systemd does not restart into the same wall.
        where = exc.filename or "a file in the state folder"
        print(
            f"{PROG}: {where}: permission denied for uid {os.geteuid()}; run as the agent's "
            f"user, or give it the state folder: chown -R <agent user>: <state_dir>",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`fleet-agent status | true`): not an error, and no complaint
        # from the interpreter flushing stdout at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
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
