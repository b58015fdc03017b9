"""Locust load test of the fleet: every Locust user is one virtual device.

The device runs the project's own logic over a synchronous paho transport
(simulator/locust_transport.py): it makes its key pair, onboards through the claim flow
(agent.provisioning: CreateCertificateFromCsr with a CSR, then RegisterThing), reconnects with
its own certificate, subscribes to its shadow topics and gets its shadow (agent.shadow's
tracker keeps versions and the delta). Its task then does, at the configured pace, shadow
updates, shadow gets and desired changes; whenever a delta arrives it reports the desired values
as reached, like an echo device.

Statistics (request type / name), each with its real duration; the types are 8 characters at
most, the width of Locust's console table:
  connect / claim, connect / thing          TCP + TLS handshake + CONNECT -> CONNACK
  sub / claim, sub / thing                  SUBSCRIBE -> SUBACK
  claim / CreateCertificateFromCsr          publish -> accepted (certificate issued)
  claim / RegisterThing                     publish -> accepted (thing registered)
  device / onboarding                       key generation -> first shadow get answered
  shadow / update                           publish -> /update/accepted
  shadow / get                              publish -> /get/accepted (404: no shadow yet, fine)
  shadow / desired -> delta                 a desired change published -> its /update/delta
  shadow / delta -> reported                a delta received -> the echo's /update/accepted
Failures carry the AWS error code (``ResourceNotFound (404): ...``, ``409: Version conflict``)
or the connection error (``TLS handshake ... failed: ...``) as the reason.

Run it with ``fleet-sim locust`` (or ``locust -f`` this file):

  fleet-sim locust --headless -u 1000 -r 50 -t 5m --host mqtts://broker.example:8883 \\
      --fleet-ca ca.pem --fleet-claim-cert claim.pem --fleet-claim-key claim.key

In distributed mode the master forwards its options to the workers; a worker's own
``--fleet-ca``, ``--fleet-claim-cert``, ``--fleet-claim-key`` and ``--fleet-serial-prefix``
win over the master's, so each machine can name its local files.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import os
import random
import secrets
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import gevent  # type: ignore[import-untyped]  # gevent ships no type hints
from cryptography.hazmat.primitives import serialization
from locust import User, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from agent import wire
from agent.keystore import generate_key
from agent.provisioning import (
    ClaimFlow,
    PrivateKey,
    ProtocolViolation,
    ProvisioningRejected,
    ProvisioningResult,
    Request,
    RetryPolicy,
)
from agent.session import (
    BrokerUnreachable,
    ConnectRefused,
    PublishRefused,
    SessionError,
    SessionTimeout,
    SubscribeRefused,
    TlsFailure,
    TlsSource,
    tls_context,
)
from agent.shadow import (
    Document,
    NextStep,
    Rejection,
    ShadowProtocolError,
    ShadowTracker,
    after_report,
    new_client_token,
    update_request,
)
from simulator import shared_tls
from simulator.locust_transport import Connection, Message

log = logging.getLogger("fleet.locust")

T = TypeVar("T")
#: Sends of one report before it counts as failed (conflicts and retryable answers).
REPORT_ATTEMPTS = 5
DEFAULT_PORT = 8883


# ------------------------------------------------------------------------------- options


class OptionError(Exception):
    """A missing or unusable ``--fleet-*`` option or ``--host``; the message says the fix."""


def _readable_file(value: str) -> str:
    try:
        with open(value, "rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None
    return value  # a str, not a Path: the master sends options to its workers as msgpack


def _number(kind: type[int] | type[float], low: float) -> Callable[[str], int | float]:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low:g}")
        return number

    return parse


def _name(value: str) -> str:
    if not wire.TEMPLATE_NAME_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: use 1-36 characters from A-Z a-z 0-9 _ -")
    return value


def _parameters(value: str) -> str:
    parse_parameters(value)  # raises ArgumentTypeError
    return value


def parse_parameters(value: str | None) -> dict[str, str]:
    """``"DeviceModel=pump,Site=line-3"`` -> template parameters."""
    parameters: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        parameters[key.strip()] = text.strip()
    return parameters


#: dest -> (flag, default, argparse type, help). Defaults are applied by `resolve`, not by
#: argparse, so a worker can tell which options were given on its own command line.
OPTIONS: dict[str, tuple[str, Any, Callable[[str], Any] | None, str]] = {
    "fleet_ca": (
        "--fleet-ca",
        None,
        _readable_file,
        "CA certificate that signed the broker's certificate (PEM)",
    ),
    "fleet_claim_cert": (
        "--fleet-claim-cert",
        None,
        _readable_file,
        "claim (bootstrap) certificate the devices onboard with (PEM)",
    ),
    "fleet_claim_key": ("--fleet-claim-key", None, _readable_file, "its private key (PEM)"),
    "fleet_template": (
        "--fleet-template",
        "fleet-default",
        _name,
        "provisioning template for RegisterThing (default fleet-default)",
    ),
    "fleet_serial_prefix": (
        "--fleet-serial-prefix",
        "locust",
        _name,
        "SerialNumber prefix; each device gets <prefix>-<process tag>-<n> (default locust)",
    ),
    "fleet_parameters": (
        "--fleet-parameters",
        "",
        _parameters,
        "more template parameters, KEY=VALUE,KEY=VALUE",
    ),
    "fleet_update_interval": (
        "--fleet-update-interval",
        5.0,
        _number(float, 0.01),
        "mean seconds between a device's shadow requests, jittered +-50%% (default 5)",
    ),
    "fleet_update_weight": (
        "--fleet-update-weight",
        8,
        _number(int, 0),
        "weight of updates (default 8)",
    ),
    "fleet_get_weight": ("--fleet-get-weight", 1, _number(int, 0), "weight of gets (default 1)"),
    "fleet_desire_weight": (
        "--fleet-desire-weight",
        1,
        _number(int, 0),
        "weight of desired changes, which the device then applies (default 1)",
    ),
    "fleet_payload_bytes": (
        "--fleet-payload-bytes",
        0,
        _number(int, 0),
        "padding added to each reported update (default 0)",
    ),
    "fleet_timeout": (
        "--fleet-timeout",
        30.0,
        _number(float, 0.1),
        "seconds allowed for a connect or a reply (default 30)",
    ),
    "fleet_keepalive": ("--fleet-keepalive", 120, _number(int, 5), "MQTT keepalive (default 120)"),
}


REQUIRED = {
    "fleet_ca": "the CA certificate that signed the broker's certificate (PEM)",
    "fleet_claim_cert": "the claim certificate the devices onboard with (PEM)",
    "fleet_claim_key": "the claim certificate's private key (PEM)",
}

#: Options a worker's own command line sets even when the master gives them: its local files,
#: and a serial prefix to tell its devices apart. Everything else comes from the master.
WORKER_OPTIONS = ("fleet_ca", "fleet_claim_cert", "fleet_claim_key", "fleet_serial_prefix")

METAVARS = {
    "fleet_ca": "FILE",
    "fleet_claim_cert": "FILE",
    "fleet_claim_key": "FILE",
    "fleet_template": "NAME",
    "fleet_serial_prefix": "PREFIX",
    "fleet_parameters": "K=V,...",
    "fleet_update_interval": "SECONDS",
    "fleet_timeout": "SECONDS",
    "fleet_keepalive": "SECONDS",
}


# locust's EventHook.add_listener has no annotations: --strict calls it an untyped decorator.
@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def add_options(parser: Any) -> None:
    for dest, (flag, _, kind, text) in OPTIONS.items():
        metavar = METAVARS.get(dest, "N")
        parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=metavar, help=text)


def options_help() -> str:
    """The ``--fleet-*`` options as help text (Locust's --help shows only its own)."""
    parser = argparse.ArgumentParser(
        prog="fleet-sim locust", add_help=False, usage=argparse.SUPPRESS
    )
    group = parser.add_argument_group("mqtt-fleet options (and --host mqtts://HOST:PORT)")
    add_options(group)
    return parser.format_help()


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    ca: str
    claim_cert: str
    claim_key: str
    template: str
    serial_prefix: str
    parameters: dict[str, str]
    interval: float
    weights: tuple[int, int, int]  # update, get, desire
    payload_bytes: int
    timeout: float
    keepalive: int


def parse_host(value: str | None) -> tuple[str, int]:
    if not value:
        raise OptionError("give the broker as --host mqtts://HOST:PORT")
    url = urlsplit(value)
    try:
        port = url.port or DEFAULT_PORT
    except ValueError:
        port = -1
    if url.scheme != "mqtts" or not url.hostname or url.path not in ("", "/") or port < 0:
        raise OptionError(f"--host {value}: write it as mqtts://HOST:PORT (mutual TLS only)")
    return url.hostname, port


def resolve(values: Mapping[str, Any], host: str | None, *, required: bool) -> Settings | None:
    """Settings from option values (None: not given); raise OptionError. ``required=False``
    (a master, which runs no users) checks only what it was given and returns None."""
    given = {dest: values.get(dest) for dest in OPTIONS}
    address = parse_host(host)
    if not required:
        return None
    for dest, what in REQUIRED.items():
        if not given[dest]:
            raise OptionError(f"{OPTIONS[dest][0]} is required: {what}")
    option: dict[str, Any] = {
        dest: default if given[dest] is None else given[dest]
        for dest, (_, default, _, _) in OPTIONS.items()
    }
    weights = (
        int(option["fleet_update_weight"]),
        int(option["fleet_get_weight"]),
        int(option["fleet_desire_weight"]),
    )
    if not any(weights):
        raise OptionError("the update, get and desire weights are all 0: nothing to do")
    try:
        claim_context(option["fleet_ca"], option["fleet_claim_cert"], option["fleet_claim_key"])
        parameters = parse_parameters(option["fleet_parameters"])
    except (SessionError, argparse.ArgumentTypeError) as exc:
        raise OptionError(str(exc)) from None
    return Settings(
        host=address[0],
        port=address[1],
        ca=option["fleet_ca"],
        claim_cert=option["fleet_claim_cert"],
        claim_key=option["fleet_claim_key"],
        template=option["fleet_template"],
        serial_prefix=option["fleet_serial_prefix"],
        parameters=parameters,
        interval=float(option["fleet_update_interval"]),
        weights=weights,
        payload_bytes=int(option["fleet_payload_bytes"]),
        timeout=float(option["fleet_timeout"]),
        keepalive=int(option["fleet_keepalive"]),
    )


@functools.lru_cache(maxsize=4)
def claim_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """One TLS context for the claim identity, shared by every user of the process."""
    return tls_context(ca, cert, key)


class _Process:
    """What one Locust process knows: its settings and how it names its devices."""

    settings: Settings | None = None
    own: ClassVar[dict[str, Any]] = {}  # machine-local options given on the command line
    _pid = 0
    _tag = ""
    _serials = itertools.count(1)

    @classmethod
    def serial(cls, prefix: str) -> str:
        """``<prefix>-<tag>-<n>``: the random tag keeps processes and machines apart. Made per
        process id, because --processes forks its workers after importing this file."""
        if cls._pid != os.getpid():
            cls._pid, cls._tag, cls._serials = os.getpid(), secrets.token_hex(3), itertools.count(1)
        return f"{prefix}-{cls._tag}-{next(cls._serials)}"


def _fail(message: str) -> None:
    sys.stderr.write(f"fleet locust: error: {message}\n")
    sys.exit(2)


@events.init.add_listener  # type: ignore[untyped-decorator]
def _on_init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    _Process.own = {dest: getattr(options, dest, None) for dest in WORKER_OPTIONS}
    if options.worker:
        return  # the master's options come with its first spawn message
    # An explicit --master may run on a machine without the device files; with --processes,
    # the master and its workers share this machine and these options.
    try:
        required = not options.master or bool(options.processes)
        resolve(vars(options), environment.host, required=required)
    except OptionError as exc:
        _fail(str(exc))


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _on_test_start(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return
    values = dict(vars(environment.parsed_options)) if environment.parsed_options else {}
    if isinstance(environment.runner, WorkerRunner):
        values.update({k: v for k, v in _Process.own.items() if v is not None})
    try:
        _Process.settings = resolve(values, environment.host, required=True)
    except OptionError as exc:
        _Process.settings = None
        log.error("fleet locust: %s; this worker stops", exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit)


# ------------------------------------------------------------------------------ failures


class FleetFailure(Exception):
    """What Locust shows for a failed step: one line, the AWS error code or the cause first."""


class AwsRejected(FleetFailure):
    """A ``/rejected`` answer: the AWS error code (or the shadow's HTTP-like code)."""


class ConnectFailed(FleetFailure):
    """TCP, TLS or CONNACK."""


class TimedOut(FleetFailure):
    pass


class Disconnected(FleetFailure):
    pass


class Refused(FleetFailure):
    """The broker refused a SUBSCRIBE or PUBLISH (its policy)."""


class BadReply(FleetFailure):
    """A reply that does not follow the AWS IoT API."""


def failure(exc: Exception) -> FleetFailure:
    if isinstance(exc, FleetFailure):
        return exc
    if isinstance(exc, ProvisioningRejected):
        return AwsRejected(f"{exc.error_code} ({exc.status_code}): {exc.error_message}")
    if isinstance(exc, SessionTimeout):
        return TimedOut(str(exc))
    if isinstance(exc, BrokerUnreachable | TlsFailure | ConnectRefused):
        return ConnectFailed(str(exc))
    if isinstance(exc, SubscribeRefused | PublishRefused):
        return Refused(str(exc))
    if isinstance(exc, ProtocolViolation | ShadowProtocolError):
        return BadReply(str(exc))
    return Disconnected(str(exc))


FAILURES = (
    SessionError,
    ProvisioningRejected,
    ProtocolViolation,
    ShadowProtocolError,
    FleetFailure,
)


class _StepFailed(Exception):
    """Raised after a failed step has been reported: stop what depends on it."""


def device_identity(ca: str, key: PrivateKey, certificate_pem: str) -> TlsSource:
    """The device's new identity on the process's one shared TLS context (about 25 KB saved
    per user: simulator/shared_tls.py); the key goes through a memfd, never a named file."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return shared_tls.identity(Path(ca), pem, certificate_pem.encode())


# --------------------------------------------------------------------------------- user

#: Waits after a failed onboarding or reconnect: full jitter, 1 s doubling to 30 s.
RETRY = RetryPolicy(base_delay=1.0, max_delay=30.0)


class FleetDevice(User):
    """One virtual device: onboard by claim, then keep its shadow busy and in sync."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = _Process.settings
        self.serial = _Process.serial(self.settings.serial_prefix if self.settings else "locust")
        self.thing: str | None = None
        self.tls: TlsSource | None = None  # not `context`: User.context() is locust's
        self.conn: Connection | None = None
        self.tracker = ShadowTracker()
        self.failures = 0
        self._onboarding_since: float | None = None  # until the device is first online
        self._sequence = 0
        self._setpoint = 0
        self._to_report: Document = {}
        self._delta_at: float | None = None
        self._reporter: gevent.Greenlet | None = None

    def wait_time(self) -> float:
        if self.failures:
            return RETRY.backoff(self.failures)
        assert self.settings is not None
        return self.settings.interval * random.uniform(0.5, 1.5)

    @property
    def online(self) -> bool:
        return self.conn is not None and not self.conn.closed

    # ------------------------------------------------------------------- lifecycle

    def on_start(self) -> None:
        if self.settings is not None:
            self._go_online()

    def on_stop(self) -> None:
        self._go_offline()

    @task
    def shadow_traffic(self) -> None:
        if self.settings is None:
            raise StopUser()
        if not self.online:
            self._go_online()
            return
        operation = random.choices(
            (self.update, self.get, self.desire), weights=self.settings.weights
        )[0]
        with contextlib.suppress(_StepFailed):  # reported; a lost connection: next turn
            operation()

    def _go_online(self) -> None:
        self._go_offline()
        if self.tls is None:
            self._onboarding_since = time.perf_counter()
        try:
            if self.tls is None:
                self._onboard()
            self._connect_thing()
        except _StepFailed:
            self._go_offline()
            self.failures += 1
            return
        self.failures = 0
        if self._onboarding_since is not None:
            self._fire("device", "onboarding", self._onboarding_since)
            self._onboarding_since = None

    def _go_offline(self) -> None:
        reporter, self._reporter = self._reporter, None
        if reporter is not None and reporter is not gevent.getcurrent():
            reporter.kill(block=False)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    # --------------------------------------------------------------------- steps

    def _fire(self, kind: str, name: str, started: float, error: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=error,
            context={},
        )

    def _step(self, kind: str, name: str, action: Callable[[], T], started: float = 0.0) -> T:
        """Run one step and report it with its duration; raise _StepFailed if it failed."""
        started = started or time.perf_counter()
        try:
            outcome = action()
        except FAILURES as exc:
            self._fire(kind, name, started, failure(exc))
            raise _StepFailed() from None
        self._fire(kind, name, started)
        return outcome

    def _connect(self, who: str, client_id: str, context: TlsSource) -> Connection:
        s = self.settings
        assert s is not None
        return self._step(
            "connect",
            who,
            lambda: Connection.open(
                s.host,
                s.port,
                client_id=client_id,
                context=context,
                timeout=s.timeout,
                keepalive=s.keepalive,
            ),
        )

    # ---------------------------------------------------------------- onboarding

    def _onboard(self) -> None:
        """The claim flow; afterwards the device has its thing name and TLS context."""
        s = self.settings
        assert s is not None
        key = generate_key()
        flow = ClaimFlow(
            key, template=s.template, parameters={**s.parameters, "SerialNumber": self.serial}
        )
        context = claim_context(s.ca, s.claim_cert, s.claim_key)
        claim = self._connect("claim", f"claim-{self.serial}", context)
        try:
            self._step(
                "sub",
                "claim",
                lambda: claim.subscribe(*flow.reply_topics(), timeout=s.timeout),
            )
            register = self._provision(claim, flow, flow.start())
            assert isinstance(register, Request)
            result = self._provision(claim, flow, register)
            assert isinstance(result, ProvisioningResult)
        finally:
            claim.close()
        self.thing = result.thing_name
        self.tls = device_identity(s.ca, key, result.certificate_pem)

    def _provision(
        self, claim: Connection, flow: ClaimFlow, request: Request
    ) -> Request | ProvisioningResult:
        s = self.settings
        assert s is not None

        def exchange() -> Request | ProvisioningResult:
            reply = claim.request(
                request.topic, request.payload, request.reply_topics, timeout=s.timeout
            )
            return flow.receive(reply.topic, reply.payload)

        return self._step("claim", flow.step.value, exchange)

    def _connect_thing(self) -> None:
        s, thing = self.settings, self.thing
        assert s is not None and thing is not None and self.tls is not None
        conn = self._connect("thing", thing, self.tls)
        conn.route(wire.shadow_reply(thing, "get", wire.ACCEPTED), self._on_document)
        conn.route(wire.shadow_reply(thing, "update", wire.ACCEPTED), self._on_update)
        conn.route(wire.shadow_delta(thing), self._on_delta)
        topics = [
            wire.shadow_reply(thing, operation, outcome)
            for operation in ("get", "update")
            for outcome in (wire.ACCEPTED, wire.REJECTED)
        ]
        self.conn = conn
        self._step(
            "sub",
            "thing",
            lambda: conn.subscribe(*topics, wire.shadow_delta(thing), timeout=s.timeout),
        )
        self.get()

    # -------------------------------------------------------------------- shadow

    def _shadow(
        self,
        operation: wire.ShadowOperation,
        document: Document,
        *,
        replies: tuple[str, ...] | None = None,
        match: Callable[[Message], bool] | None = None,
    ) -> None:
        """One shadow request, answered on accepted/rejected with our clientToken (or as
        ``replies``/``match`` say); a rejection raises AwsRejected (a get's 404 is no
        shadow yet)."""
        reply = self._answer(operation, document, replies=replies, match=match)
        if isinstance(reply, Rejection):
            if not (operation == "get" and reply.code == 404):
                raise AwsRejected(f"{reply.code}: {reply.message}")
            self.tracker.on_get_missing()

    def _answer(
        self,
        operation: wire.ShadowOperation,
        document: Document,
        *,
        replies: tuple[str, ...] | None = None,
        match: Callable[[Message], bool] | None = None,
    ) -> Message | Rejection:
        """The reply to one shadow request: the accepted message, or the Rejection."""
        s, thing, conn = self.settings, self.thing, self.conn
        assert s is not None and thing is not None
        if conn is None:
            raise Disconnected("not connected")
        token = document["clientToken"]
        rejected = wire.shadow_reply(thing, operation, wire.REJECTED)
        reply = conn.request(
            wire.shadow_topic(thing, operation),
            wire.encode(document),
            replies or (wire.shadow_reply(thing, operation, wire.ACCEPTED), rejected),
            timeout=s.timeout,
            match=match or (lambda m: m.field("clientToken") == token),
        )
        return Rejection.parse(reply.document) if reply.topic == rejected else reply

    def _report(self, patch: Document, name: str, started: float = 0.0) -> None:
        """Report ``patch`` as the agent does (agent.shadow.after_report): with the version
        for optimistic locking; a 409 gets the document and sends again, 429, 5xx and no
        reply back off and send again, a refusal fails. One step, timed until accepted;
        each conflict is counted as a "version conflict" row of its own."""
        started = started or time.perf_counter()
        conflicts = failures = 0
        for _ in range(REPORT_ATTEMPTS):
            document = update_request(patch, new_client_token("lc"), self.tracker.lock_version())
            try:
                reply = self._answer("update", document)
                outcome = reply if isinstance(reply, Rejection) else reply.document
            except SessionTimeout:
                outcome = Rejection(504, "no reply", None)
            except FAILURES as exc:  # the connection is gone, or a reply we cannot read
                self._fire("shadow", name, started, failure(exc))
                raise _StepFailed() from None
            decision = after_report(
                outcome, conflicts=conflicts, failures=failures, backoff=RETRY.backoff
            )
            conflicts, failures = decision.conflicts, decision.failures
            if decision.step is NextStep.SENT:
                self._fire("shadow", name, started)
                return
            if decision.step is NextStep.PARK:
                assert isinstance(outcome, Rejection)
                error = AwsRejected(f"{outcome.code}: {outcome.message}")
                self._fire("shadow", name, started, error)
                raise _StepFailed()
            gevent.sleep(decision.delay)
            if decision.step is NextStep.RESYNC:
                self._fire("shadow", "version conflict", time.perf_counter())
                try:
                    self.get()  # its reply sets the tracker's version (_on_document)
                except _StepFailed:  # the get's failure is reported; so is the report's
                    self._fire("shadow", name, started, Disconnected("no get after a conflict"))
                    raise
        self._fire("shadow", name, started, TimedOut(f"not accepted in {REPORT_ATTEMPTS} tries"))
        raise _StepFailed()

    def update(self) -> None:
        """Report a new state: publish -> /update/accepted (conflicts resolved on the way)."""
        self._sequence += 1
        reported: Document = {"locust": {"seq": self._sequence}}
        assert self.settings is not None
        if self.settings.payload_bytes:
            reported["locust"]["pad"] = "x" * self.settings.payload_bytes
        self._report(reported, "update")

    def get(self) -> None:
        document = {"clientToken": new_client_token("lc")}
        self._step("shadow", "get", lambda: self._shadow("get", document))

    def desire(self) -> None:
        """Change desired through the device's own connection, as an operator would through
        the service, and time it until the device holds the delta (the echo follows)."""
        assert self.thing is not None
        self._setpoint += 1
        setpoint, token = self._setpoint, new_client_token("lc")
        document = {"state": {"desired": {"setpoint": setpoint}}, "clientToken": token}
        delta = wire.shadow_delta(self.thing)
        rejected = wire.shadow_reply(self.thing, "update", wire.REJECTED)

        def ours(message: Message) -> bool:
            if message.topic == rejected:
                return message.field("clientToken") == token
            state = message.field("state")
            return isinstance(state, dict) and state.get("setpoint") == setpoint

        self._step(
            "shadow",
            "desired -> delta",
            lambda: self._shadow("update", document, replies=(delta, rejected), match=ours),
        )

    # ----------------------------------------- messages (on the connection's reader)

    def _on_document(self, message: Message) -> None:
        try:
            self._apply(self.tracker.on_get_accepted(message.document))
        except ShadowProtocolError as exc:
            log.debug("%s: %s", self.thing, exc)

    def _on_update(self, message: Message) -> None:
        try:
            self.tracker.on_update_accepted(message.document)
        except ShadowProtocolError as exc:
            log.debug("%s: %s", self.thing, exc)

    def _on_delta(self, message: Message) -> None:
        try:
            delta = self.tracker.on_delta(message.document)
        except ShadowProtocolError as exc:
            log.debug("%s: %s", self.thing, exc)
            return
        if delta:
            self._apply(delta)

    def _apply(self, delta: Document) -> None:
        """The echo device reaches whatever is desired: queue it as reported, once per value."""
        fresh = self.tracker.to_apply(delta)
        if not fresh:
            return
        self._to_report.update(fresh)
        if self._delta_at is None:
            self._delta_at = time.perf_counter()
        if self._reporter is None or self._reporter.dead:
            self._reporter = gevent.spawn(self._report_reached)

    def _report_reached(self) -> None:
        while self._to_report and self.online:
            patch, self._to_report = self._to_report, {}
            started, self._delta_at = self._delta_at or time.perf_counter(), None
            try:
                self._report(patch, "delta -> reported", started)
            except _StepFailed:
                self.tracker.forget_attempts(patch)  # tried again on the next delta or get
                return
