"""``fleet-broker``: the local fleet cloud's command line.

Every failure is one line on stderr naming the problem and the fix, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt

from agent import distribution_version, wire
from broker import bootstrap, extras
from broker.config import BrokerConfig, ConfigError, load_config
from broker.hooks import HookConfigError, load_hooks
from broker.mosquitto import BrokerError, RunFiles, check_broker_can_reach
from broker.mqtt import ConnectError, connect, disconnect, tls_context
from broker.pki import PkiError, PkiPaths
from broker.registry import (
    CertificateRecord,
    CertificateRole,
    CertificateStatus,
    SQLiteRegistry,
    Thing,
    ThingStatus,
)
from broker.stack import RunningState, Stack, pid_alive
from broker.templates import TemplateLoadError, load_templates

# The scheme of all three tools: 0 done, 1 failed or refused, 2 bad command line or
# configuration (fix it; retrying will not help), 3 not running or unreachable, 130 Ctrl-C.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


class CommandError(Exception):
    pass


def _config(args: argparse.Namespace, **overrides: object) -> BrokerConfig:
    return load_config(args.dir, getattr(args, "config", None), **overrides)


# ------------------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    paths = bootstrap.initialize(args.dir, hostnames=args.host, force=args.force)
    print(f"PKI created in {paths.root}")
    print(f"  CA certificate        {paths.ca_cert}")
    print(
        f"  broker certificate    {paths.broker_cert}  (localhost, 127.0.0.1, ::1"
        + "".join(f", {h}" for h in args.host)
        + ")"
    )
    print(f"  claim credentials     {paths.claim_cert}, {paths.claim_key}")
    print(f"  service credentials   {paths.service_cert}, {paths.service_key}")
    print(f"  registry              {paths.registry}")
    print(f"  broker config         {paths.broker_config}")
    try:
        check_broker_can_reach(_config(args))
    except BrokerError as exc:
        print(f"warning: {exc}")
    print(f"Next: fleet-broker up --dir {args.dir}")
    return EXIT_OK


def cmd_broker_cert(args: argparse.Namespace) -> int:
    names = bootstrap.add_broker_names(args.dir, args.host)
    print(f"reissued the broker certificate for: {', '.join(names)}")
    print(
        "devices keep working (they trust the CA); a running broker uses it from its next "
        f"start: fleet-broker down --dir {args.dir}, then fleet-broker up --dir {args.dir}"
    )
    return EXIT_OK


def cmd_issue_claim(args: argparse.Namespace) -> int:
    issued = bootstrap.issue_claims(args.dir, name=args.name, count=args.count)
    folder = issued[0][0].parent
    print(
        f"{len(issued)} claim certificate(s) in {folder} (registered ACTIVE, label {args.name!r})"
    )
    return EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    config = _config(args, port=args.port, bind_address=args.bind, log_level=args.log_level)
    stack = Stack(config, config_file=args.config)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stack.request_stop())
    stack.start()
    pki = PkiPaths(config.pki_dir)
    print(f"mqtt-fleet broker side is up (Ctrl-C or fleet-broker down --dir {args.dir} to stop)")
    print(
        f"  listening on   {config.bind_address}:{config.port}  (mutual TLS, TLS >= 1.2); "
        f"from here: mqtts://{config.connect_host}:{config.port}"
    )
    print(f"  CA certificate {pki.ca_cert}")
    print(f"  claim cert     {pki.claim_cert}")
    print(f"  claim key      {pki.claim_key}")
    print(f"  logs           {stack.files.log}, {stack.files.services_log}")
    sys.stdout.flush()
    code = stack.supervise()
    print("mqtt-fleet broker side stopped")
    return code


def cmd_down(args: argparse.Namespace) -> int:
    files = RunFiles(_config(args).run_dir)
    state = RunningState.read(files)
    if state is None or not pid_alive(state.supervisor_pid):
        print("not running")
        return EXIT_OK
    os.kill(state.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    # `up` removes the state file as its last act; its pid may linger as an unreaped zombie.
    while files.state.exists() and pid_alive(state.supervisor_pid):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if files.state.exists() and pid_alive(state.supervisor_pid):
        raise CommandError(f"pid {state.supervisor_pid} did not stop within 20 s; kill it")
    print("stopped")
    return EXIT_OK


def _service_client(args: argparse.Namespace, host: str, port: int, purpose: str) -> mqtt.Client:
    pki = PkiPaths(args.dir.resolve())
    return connect(
        host,
        port,
        context=tls_context(pki.ca_cert, pki.service_cert, pki.service_key),
        client_id=wire.operator_client_id(purpose),
        timeout=5,
    )


def _sys_values(
    args: argparse.Namespace, state: RunningState, topics: Sequence[str]
) -> dict[str, str]:
    values: dict[str, str] = {}
    got = threading.Event()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        values[message.topic] = message.payload.decode(errors="replace")
        if all(t in values for t in topics):
            got.set()

    client = _service_client(args, state.host, state.port, "status")
    client.on_message = on_message
    for topic in topics:
        client.subscribe(topic)
    got.wait(3)
    disconnect(client)
    return values


def cmd_status(args: argparse.Namespace) -> int:
    files = RunFiles(_config(args).run_dir)
    state = RunningState.read(files)
    if state is None or not pid_alive(state.supervisor_pid):
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print(f"not running; start it with: fleet-broker up --dir {args.dir}")
        return EXIT_NOT_RUNNING
    report: dict[str, object] = {
        "running": True,
        "uptime_seconds": round(time.time() - state.started_at),
        "supervisor_pid": state.supervisor_pid,
        "mosquitto": "running" if pid_alive(state.mosquitto_pid) else "DEAD",
        "mosquitto_pid": state.mosquitto_pid,
        "endpoint": f"{state.host}:{state.port}",
        "services": "running" if pid_alive(state.services_pid) else "restarting",
        "services_pid": state.services_pid,
        "services_restarts": state.services_restarts,
    }
    code = EXIT_OK
    try:
        values = _sys_values(args, state, ["$SYS/broker/clients/connected", "$SYS/broker/version"])
        report["clients_connected"] = int(values.get("$SYS/broker/clients/connected", -1))
        report["version"] = values.get("$SYS/broker/version", "?")
    except ConnectError as exc:
        report["error"] = str(exc)
        code = EXIT_ERROR
    if args.json:
        print(json.dumps(report))
        return code
    uptime = report["uptime_seconds"]
    print(f"fleet-broker up since {uptime} s (supervisor pid {state.supervisor_pid})")
    print(f"  mosquitto  {report['mosquitto']} (pid {state.mosquitto_pid}) on {report['endpoint']}")
    restarted = f", restarted {state.services_restarts} time(s)" if state.services_restarts else ""
    print(f"  services   {report['services']} (pid {state.services_pid}{restarted})")
    if "error" in report:
        print(f"  clients    unknown ({report['error']})")
        return code
    print(f"  clients    {report['clients_connected']} connected (broker figure, every 5 s)")
    print(f"  version    {report['version']}")
    return code


def _actor() -> str:
    """Who runs an operator command, for the audit log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} (fleet-broker)"


def _endpoint(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("give the broker's host name, not an empty string")
    return value.strip()


def cmd_revoke(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    revoked = bootstrap.revoke(args.dir, args.target, actor=_actor(), with_claim=args.claim)
    with _registry(args) as registry:
        thing = registry.get_thing(args.target)
    if thing is not None:
        print(
            f"revoked thing {thing.name}: no certificate can be registered for it until "
            f"fleet-broker --dir {args.dir} things enable {thing.name}"
        )
    for record in revoked:
        owner = f"thing {record.thing_name}" if record.thing_name else record.role.value
        if record.revoked_at is not None and record.revoked_at < started:
            print(
                f"certificate {record.id[:16]}… ({owner}) was revoked already, "
                f"at {record.revoked_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        else:
            print(f"revoked certificate {record.id[:16]}… ({owner})")
    # From here the plugin refuses them at CONNECT and drops live connections within a second
    # (it sweeps the registry), and the services refuse requests stamped with them. The kick
    # below only makes the disconnect immediate; the reload makes new TLS handshakes fail.
    state = RunningState.read(RunFiles(_config(args).run_dir))
    local = state is not None and pid_alive(state.mosquitto_pid)
    if args.endpoint is None and not local:
        print(
            "no broker runs from this folder; one running elsewhere drops them within a second "
            "(--endpoint HOST: at once)"
        )
        return EXIT_OK
    if args.endpoint is not None:
        host, port = args.endpoint, args.port
    else:
        assert state is not None  # the local broker (see above)
        host, port = state.host, state.port
        # Reload before the kick: the kicked device reconnects at once, and its handshake
        # must meet the new CRL (a "certificate revoked" alert stops an agent for good; the
        # plugin's CONNECT refusal alone makes it wait and retry). Mosquitto takes the signal
        # in its next loop turn, long before the kick's own connection is up.
        os.kill(state.mosquitto_pid, signal.SIGHUP)
    try:
        client = _service_client(args, host, port, "revoke")
        payload = "\n".join(f"kick-certificate {r.id}" for r in revoked)
        client.publish(wire.CONTROL_TOPIC, payload, qos=1).wait_for_publish(5)
        disconnect(client)
        kicked = "disconnected any live connection using them"
    except ConnectError as exc:
        kicked = (
            f"could not reach the broker to disconnect them at once ({exc}); it drops them "
            "within a second by itself"
        )
    if args.endpoint is None:
        print(f"told the broker to re-read the CRL (SIGHUP), then {kicked}")
    else:
        print(
            f"{kicked} at {host}:{port}; the registry refuses them from now on. That broker "
            "reads the new CRL at its next reload (SIGHUP; in docker compose: docker compose "
            "kill -s HUP broker)"
        )
    return EXIT_OK


def cmd_things_enable(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        thing = registry.enable_thing(args.thing, actor=_actor())
    print(
        f"thing {thing.name} enabled: it may register a new certificate (by claim) again; "
        "its revoked certificates stay revoked"
    )
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        entries = registry.audit_log(args.limit)
    print(f"{'WHEN (UTC)':<20} {'ACTION':<19} {'TARGET':<32} {'WHO':<32} DETAIL")
    for e in reversed(entries):
        print(f"{e.at:%Y-%m-%d %H:%M:%S}  {e.action:<19} {e.target:<32} {e.actor:<32} {e.detail}")
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    return EXIT_OK


def _registry(args: argparse.Namespace) -> SQLiteRegistry:
    pki = PkiPaths(args.dir.resolve())
    if not pki.registry.exists():
        raise CommandError(f"no registry in {pki.root}: run fleet-broker init --dir {args.dir}")
    return SQLiteRegistry.open(pki.registry)


def cmd_things(args: argparse.Namespace) -> int:
    if getattr(args, "things_command", None) == "enable":
        return cmd_things_enable(args)
    with _registry(args) as registry:
        things = [
            (t, len(registry.list_certificates(thing_name=t.name)))
            for t in registry.list_things()
            if args.status is None or t.status.value == args.status
        ]
    if args.json:
        print(json.dumps([_thing_json(t, count) for t, count in things], indent=2))
        return EXIT_OK
    print(f"{'THING':<40} {'STATUS':<8} {'CERTIFICATES':>12}  ATTRIBUTES")
    for thing, count in things:
        attributes = " ".join(f"{k}={v}" for k, v in sorted(thing.attributes.items())) or "-"
        print(f"{thing.name:<40} {thing.status.value:<8} {count:>12}  {attributes}")
    print(f"{len(things)} thing(s)")
    return EXIT_OK


def _thing_json(thing: Thing, certificates: int) -> dict[str, object]:
    return {
        "name": thing.name,
        "status": thing.status.value,
        "revoked_at": thing.revoked_at.isoformat() if thing.revoked_at else None,
        "revoked_by": thing.revoked_by,
        "attributes": dict(thing.attributes),
        "thing_groups": list(thing.thing_groups),
        "certificates": certificates,
        "created_at": thing.created_at.isoformat(),
    }


def cmd_certs(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        records = registry.list_certificates(
            thing_name=args.thing,
            status=CertificateStatus(args.status) if args.status else None,
            role=CertificateRole(args.role) if args.role else None,
        )
    if args.json:
        print(json.dumps([_certificate_json(r) for r in records], indent=2))
        return EXIT_OK
    print(f"{'CERTIFICATE ID':<18} {'ROLE':<8} {'STATUS':<19} {'THING / LABEL':<32} EXPIRES")
    for r in records:
        print(
            f"{r.id[:16]:<18} {r.role.value:<8} {r.status.value:<19} "
            f"{(r.thing_name or r.label or '-'):<32} {r.not_after:%Y-%m-%d}"
        )
    print(f"{len(records)} certificate(s)")
    return EXIT_OK


def _certificate_json(record: CertificateRecord) -> dict[str, object]:
    return {
        "id": record.id,
        "role": record.role.value,
        "status": record.status.value,
        "thing": record.thing_name,
        "label": record.label,
        "not_after": record.not_after.isoformat(),
        "created_at": record.created_at.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
        "registered_by": record.registered_by,
    }


def cmd_templates(args: argparse.Namespace) -> int:
    config = _config(args)
    folder = config.templates_dir
    if not folder.is_dir():
        raise CommandError(f"no templates folder {folder}: run fleet-broker init --dir {args.dir}")
    templates = load_templates(folder)
    hooks = load_hooks(folder, list(templates))
    print(f"{'TEMPLATE':<24} {'HOOK':<12} PARAMETERS")
    for name, template in sorted(templates.items()):
        parameters = []
        for parameter, spec in template.body.get("Parameters", {}).items():
            default = spec.get("Default") if isinstance(spec, dict) else None
            parameters.append(parameter if default is None else f"{parameter}={default}")
        hook = type(hooks[name]).__name__ if name in hooks else "-"
        print(f"{name:<24} {hook:<12} {', '.join(parameters) or '-'}")
        if template.description:
            print(f"{'':<24} {template.description}")
    print(f"{len(templates)} template(s) in {folder}")
    return EXIT_OK


def _broker_address(args: argparse.Namespace) -> tuple[str, int]:
    """--endpoint/--port, or the broker that `fleet-broker up` runs from this folder."""
    if args.endpoint is not None:
        return args.endpoint, args.port
    state = RunningState.read(RunFiles(_config(args).run_dir))
    if state is None or not pid_alive(state.mosquitto_pid):
        raise CommandError(
            f"the broker side is not running: fleet-broker up --dir {args.dir} (or name "
            "a broker running elsewhere with --endpoint HOST)"
        )
    return state.host, state.port


def cmd_watch(args: argparse.Namespace) -> int:
    """What `mosquitto_sub -v` gives by hand: a thing's shadow documents, deltas and presence
    as they change, one line each, until Ctrl-C or SIGTERM."""
    host, port = _broker_address(args)
    thing = args.thing or "+"
    topics = [
        wire.shadow_documents(thing),
        wire.shadow_delta(thing),
        wire.shadow_documents(thing, "+"),
        wire.shadow_delta(thing, "+"),
        wire.status_topic(thing),
    ]
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        stamp = time.strftime("%H:%M:%S")
        text = message.payload.decode(errors="replace")
        print(f"{stamp} {message.topic} {text}", flush=True)

    client = _service_client(args, host, port, "watch")
    client.on_message = on_message
    client.subscribe([(topic, 1) for topic in topics])
    print(f"watching {args.thing or 'every thing'} at {host}:{port} (Ctrl-C stops)", flush=True)
    try:
        while not stop.wait(0.5):
            if not client.is_connected():
                raise CommandError(f"the broker at {host}:{port} closed the connection")
    finally:
        disconnect(client)
    return EXIT_OK


def _desired_state(assignments: Sequence[str]) -> dict[str, object]:
    try:
        return wire.state_from_assignments(assignments)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def cmd_shadow(args: argparse.Namespace) -> int:
    host, port = _broker_address(args)
    operations: dict[str, wire.ShadowOperation] = {
        "get": "get",
        "desire": "update",
        "delete": "delete",
    }
    operation = operations[args.shadow_command]
    request: dict[str, object] = {"clientToken": f"fleet-cli-{os.getpid()}-{time.time_ns()}"}
    if args.shadow_command == "desire":
        request["state"] = {"desired": _desired_state(args.assignments)}
        if args.endpoint is None:
            with _registry(args) as registry:
                if registry.get_thing(args.thing) is None:
                    # AWS keeps shadows of unregistered things too; a typo must not pass unseen.
                    print(
                        f"note: no thing {args.thing} in the registry (fleet-broker things "
                        "lists them); the shadow is changed all the same",
                        file=sys.stderr,
                    )
    topic = wire.shadow_topic(args.thing, operation, args.name)
    replies = {wire.reply(topic, "accepted"), wire.reply(topic, "rejected")}
    answer: dict[str, object] = {}
    got = threading.Event()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        if message.topic in replies:
            document = json.loads(message.payload)
            if document.get("clientToken") == request["clientToken"]:
                answer.update(document, _outcome=message.topic.rsplit("/", 1)[1])
                got.set()

    subscribed = threading.Event()
    client = _service_client(args, host, port, "shadow")
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    # Subscribe to the replies before publishing, or the answer may be lost.
    client.subscribe([(reply_topic, 1) for reply_topic in sorted(replies)])
    if not subscribed.wait(5):
        disconnect(client)
        raise CommandError("the broker did not acknowledge the reply subscription")
    client.publish(topic, json.dumps(request), qos=1)
    arrived = got.wait(10)
    disconnect(client)
    if not arrived:
        raise CommandError(f"no answer on {topic} within 10 s (are the fleet services running?)")
    outcome = answer.pop("_outcome")
    answer.pop("clientToken", None)
    if outcome == "rejected":
        raise CommandError(f"{answer.get('code')} {answer.get('message')}")
    print(json.dumps(answer, indent=2, sort_keys=True))
    return EXIT_OK


# --------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-broker",
        description="A local, secure MQTT cloud for a device fleet: Mosquitto with mutual TLS "
        "and the mqtt-fleet plugin, a CA, a device registry and the fleet services.",
        epilog="exit codes: 0 done, 1 failed or refused, 2 bad command line or configuration, "
        "3 not running, 130 interrupted. Example: fleet-broker init && fleet-broker up",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {distribution_version()}")
    dir_help = "PKI, registry and run folder (default: certs)"
    parser.add_argument("--dir", type=Path, default=Path("certs"), help=dir_help)
    # The same option after the command too (`fleet-broker up --dir X`, as every hint prints
    # it): SUPPRESS, so a subcommand without it keeps the value given before the command.
    anywhere = argparse.ArgumentParser(add_help=False)
    anywhere.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[anywhere])
        p.set_defaults(handler=handler)
        return p

    p = add(
        "init", cmd_init, "create the CA, broker, claim and service credentials and the registry"
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="extra DNS name or IP address for the broker certificate (repeatable)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing PKI (revokes everything)"
    )

    p = add(
        "broker-cert",
        cmd_broker_cert,
        "reissue the broker certificate with more host names (keeps the CA and every device)",
    )
    p.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="DNS name or IP address to add (repeatable)",
    )

    p = add("issue-claim", cmd_issue_claim, "mint more claim (bootstrap) certificates")
    p.add_argument("name", help="batch name: the folder under <dir>/claims and the registry label")
    p.add_argument("--count", type=int, default=1, help="how many (one per device); default 1")

    p = add("up", cmd_up, "start Mosquitto with the plugin and the fleet services; Ctrl-C stops")
    p.add_argument("--port", type=int, help="listener port (default from broker.toml: 8883)")
    p.add_argument("--bind", help="listener address (default from broker.toml: 0.0.0.0)")
    p.add_argument("--log-level", choices=["error", "warning", "notice", "info", "debug"])
    p.add_argument("--config", type=Path, help="broker config (default: <dir>/broker.toml)")

    add("down", cmd_down, "stop a running fleet-broker up")
    p = add("status", cmd_status, "what runs, on which port, how many clients are connected")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add(
        "revoke",
        cmd_revoke,
        "revoke a thing (its certificates, and it may not register again until enabled) or one "
        "certificate, at once",
    )
    p.add_argument("target", help="thing name, certificate id, or a unique id prefix (8+ hex)")
    p.add_argument(
        "--claim",
        action="store_true",
        help="also revoke the per-device claim certificate the thing onboarded with (refused "
        "if that claim onboarded other things too)",
    )
    _add_endpoint(p)

    things = add("things", cmd_things, "list registered things, with their status")
    things.add_argument("--json", action="store_true", help="print a JSON array")
    things.add_argument("--status", choices=[s.value for s in ThingStatus], help="only these")
    things_sub = things.add_subparsers(dest="things_command", metavar="ACTION")
    p = things_sub.add_parser(
        "enable",
        help="let a revoked thing register a new certificate again (audited)",
        description="let a revoked thing register a new certificate again (audited)",
        parents=[anywhere],
    )
    p.add_argument("thing", help="thing name")
    p = add("audit", cmd_audit, "operator actions on the registry: revocations, re-enables")
    p.add_argument("--limit", type=int, default=100, help="newest N entries (default 100)")
    p = add("certs", cmd_certs, "list registered certificates with role and status")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.add_argument("--thing", help="only this thing's")
    p.add_argument("--status", choices=[s.value for s in CertificateStatus], help="only these")
    p.add_argument("--role", choices=[r.value for r in CertificateRole], help="only these")
    shadow = add("shadow", cmd_shadow, "read or change a thing's shadow (classic or named)")
    shadow_sub = shadow.add_subparsers(dest="shadow_command", required=True, metavar="ACTION")
    for action, text in (
        ("get", "print the shadow document, with its delta"),
        (
            "desire",
            "set desired state: key=value ... (JSON values; dotted keys nest; null deletes)",
        ),
        ("delete", "delete the shadow"),
    ):
        p = shadow_sub.add_parser(action, help=text, description=text, parents=[anywhere])
        p.add_argument("thing", help="thing name")
        p.add_argument("--name", help="named shadow (default: the classic shadow)")
        _add_endpoint(p)
        if action == "desire":
            p.add_argument("assignments", nargs="+", metavar="key=value")
    add("templates", cmd_templates, "list the provisioning templates devices can register with")
    p = add(
        "watch",
        cmd_watch,
        "print a thing's shadow documents, deltas and presence as they change (all things "
        "without a name)",
    )
    p.add_argument("thing", nargs="?", help="thing name (default: every thing)")
    _add_endpoint(p)
    return parser


def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint",
        metavar="HOST",
        type=_endpoint,
        help="a broker that does not run from this folder here (in docker compose: broker, "
        "from the services container); default: the local fleet-broker up",
    )
    parser.add_argument("--port", type=int, default=8883, help="its port (default 8883)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        extras.require("broker", ["cbor2"], command="fleet-broker")
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except (ConfigError, TemplateLoadError, HookConfigError, extras.MissingExtra) as exc:
        print(f"fleet-broker: error: {exc}", file=sys.stderr)
        return EXIT_USAGE  # what the user configured: fix it, do not retry
    except (
        BrokerError,
        PkiError,
        CommandError,
        ConnectError,
    ) as exc:
        print(f"fleet-broker: error: {exc}", file=sys.stderr)
    except (LookupError, ValueError) as exc:  # registry: unknown target, invalid name
        print(f"fleet-broker: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
    except sqlite3.Error as exc:
        print(f"fleet-broker: error: registry: {exc}", file=sys.stderr)
    except PermissionError as exc:
        print(
            f"fleet-broker: error: {exc.filename}: permission denied; run as the user that "
            "ran fleet-broker init (or root)",
            file=sys.stderr,
        )
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`fleet-broker status | head`): not an error, and no traceback
        # from the interpreter flushing stdout at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
