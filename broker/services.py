"""The fleet-services process: the cloud side of the AWS IoT MQTT APIs.

It connects with the service identity under the configured client id, with a persistent
session, so requests the broker plugin forwards while it restarts are queued for it. The
plugin stamps every forwarded request with the sender's identity; a request without that
stamp did not come through the plugin (a Last Will, say) and is never acted on.

Services register handlers for request-topic filters; replies to provisioning requests go
to the one connection that asked (``Responder.reply``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent import wire
from agent.durable import write_atomic
from broker.config import BrokerConfig, ConfigError, load_config
from broker.hooks import HookConfigError, load_hooks
from broker.identity import Request, sender_of
from broker.mosquitto import RunFiles
from broker.mqtt import ConnectError, tls_context
from broker.pki import CertificateAuthority, PkiError, PkiPaths
from broker.provisioning import ProvisioningService, ProvisioningSettings
from broker.registry import SQLiteRegistry
from broker.service_connection import Inbound, ServiceConnection
from broker.shadow_service import ShadowService
from broker.templates import TemplateLoadError, load_templates, write_default_template

log = logging.getLogger("fleet.services")

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600


class Responder:
    def __init__(self, connection: ServiceConnection) -> None:
        self._connection = connection

    def reply(self, request: Request, topic: str, payload: bytes) -> None:
        """Deliver to the connection that sent ``request`` only (QoS 1)."""
        self._connection.publish(
            topic,
            payload,
            (
                (wire.PROPERTY_REPLY_TO, request.sender.client_id),
                (wire.PROPERTY_CONNECTION, request.sender.connection),
            ),
        )

    def publish(self, topic: str, payload: bytes) -> None:
        """An ordinary publish: every subscriber the policy lets receive it gets it."""
        self._connection.publish(topic, payload)


Handler = Callable[[Request, Responder], None]
BatchHandler = Callable[[list[Request], Responder], None]


@dataclass(frozen=True, slots=True)
class _Route:
    """Requests one at a time: inline, or in the pool if the handler may block."""

    pattern: re.Pattern[str]
    handler: Handler
    may_block: bool


@dataclass(frozen=True, slots=True)
class _BatchRoute:
    """Requests inline, in arrival order, several at once when several arrived together."""

    pattern: re.Pattern[str]
    handler: BatchHandler


@dataclass(slots=True)
class _Periodic:
    every: float
    due: float  # time.monotonic()
    task: Callable[[], None]


def _filter_pattern(topic_filter: str) -> re.Pattern[str]:
    """An MQTT topic filter as a regular expression (paho's topic_matches_sub builds a
    matcher tree per call, a measurable share of every request)."""
    levels = topic_filter.split("/")
    tail = "(?:/.*)?" if levels[-1] == "#" else ""
    if tail:
        levels.pop()
    return re.compile(
        "/".join("[^/]*" if level == "+" else re.escape(level) for level in levels) + tail
    )


class FleetServices:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.files = RunFiles(config.run_dir)
        self._routes: list[_Route | _BatchRoute] = []
        self._stop = threading.Event()
        self._unrouted: set[str] = set()
        # Handlers that may block (a pre-provisioning hook may take 5 s) run here, so one slow
        # request never stalls the others. Batch handlers run inline, in arrival order.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fleet-worker")
        self._periodic: list[_Periodic] = []
        self._responder: Responder | None = None
        self._connection: ServiceConnection | None = None
        # Requests handed to the pool and not finished: its queue plus those running.
        self._in_pool = 0
        self._in_pool_lock = threading.Lock()
        self._received = 0

    def route(self, topic_filter: str, handler: Handler, *, may_block: bool = False) -> None:
        self._routes.append(_Route(_filter_pattern(topic_filter), handler, may_block))

    def route_batch(self, topic_filter: str, handler: BatchHandler) -> None:
        """Requests on ``topic_filter`` go to ``handler`` inline, in arrival order, several at
        once when several arrived together; they are acknowledged when it returns."""
        self._routes.append(_BatchRoute(_filter_pattern(topic_filter), handler))

    def publish_stats(self, every: float = 1.0) -> None:
        """Publish `stats()` on SERVICE_STATS_TOPIC every so often (only the service identity
        may read it; with no subscriber the broker drops it)."""
        self.every(every, self._publish_stats)

    def every(self, seconds: float, task: Callable[[], None]) -> None:
        """Run ``task`` periodically on the service's own loop."""
        self._periodic.append(_Periodic(seconds, time.monotonic() + seconds, task))

    def stop(self) -> None:
        self._stop.set()

    def _on_batch(self, messages: list[Inbound]) -> None:
        responder = self._responder
        assert responder is not None
        batches: dict[BatchHandler, list[Request]] = {}
        for message in messages:
            sender = sender_of(message)
            if sender is None:
                log.warning("dropped a message on %s without broker identity", message.topic)
                continue
            request = Request(message.topic, message.payload, sender)
            for route in self._routes:
                if route.pattern.fullmatch(message.topic):
                    if isinstance(route, _BatchRoute):
                        batches.setdefault(route.handler, []).append(request)
                    elif route.may_block:
                        with self._in_pool_lock:
                            self._in_pool += 1
                        self._pool.submit(self._run_pooled, route.handler, request, responder)
                    else:
                        self._run(route.handler, request, responder)
                    break
            else:
                if message.topic not in self._unrouted:
                    self._unrouted.add(message.topic)
                    log.warning("no service handles %s yet", message.topic)
        for batch_handler, requests in batches.items():
            try:
                batch_handler(requests, responder)
            except Exception:  # one bad batch must never stop the service
                log.exception("handler for %d request(s) failed", len(requests))
        self._received += len(messages)

    def _run_pooled(self, handler: Handler, request: Request, responder: Responder) -> None:
        try:
            self._run(handler, request, responder)
        finally:
            with self._in_pool_lock:
                self._in_pool -= 1

    def stats(self) -> dict[str, float]:
        """Queue depths and totals right now, for SERVICE_STATS_TOPIC."""
        depths = self._connection.depths() if self._connection is not None else {}
        return {
            "at": round(time.time(), 3),
            **depths,
            "provisioning_in_pool": self._in_pool,
            "requests_received": self._received,
        }

    def _publish_stats(self) -> None:
        if self._responder is not None:
            self._responder.publish(wire.SERVICE_STATS_TOPIC, json.dumps(self.stats()).encode())

    @staticmethod
    def _run(handler: Handler, request: Request, responder: Responder) -> None:
        try:
            handler(request, responder)
        except Exception:  # one bad request must never stop the service
            log.exception("handler for %s failed", request.topic)

    def run(self) -> None:
        # A ready file left by a killed earlier run would make a health check pass before
        # this one has connected (docker compose's services check reads it).
        self.files.services_ready.unlink(missing_ok=True)
        pki = PkiPaths(self.config.pki_dir)
        connection = ServiceConnection(
            self.config.connect_host,
            self.config.port,
            context=tls_context(pki.ca_cert, pki.service_cert, pki.service_key),
            client_id=self.config.services_client_id,
            session_expiry=SESSION_EXPIRY_SECONDS,
            on_batch=self._on_batch,
        )
        self._responder = Responder(connection)
        self._connection = connection
        connection.start()
        _write_ready(self.files.services_ready)
        log.info("connected as %s; ready", self.config.services_client_id)
        try:
            while not self._stop.wait(0.25):
                now = time.monotonic()
                for periodic in self._periodic:
                    if now >= periodic.due:
                        periodic.due = now + periodic.every
                        try:
                            periodic.task()
                        except Exception:
                            log.exception("periodic task failed")
        finally:
            connection.stop()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.files.services_ready.unlink(missing_ok=True)


def install_provisioning(
    services: FleetServices, config: BrokerConfig, registry: SQLiteRegistry
) -> None:
    """Fleet Provisioning: templates and hooks from the templates folder, the CA, the registry."""
    pki = PkiPaths(config.pki_dir)
    if not config.templates_dir.exists():
        write_default_template(config.templates_dir)
    templates = load_templates(config.templates_dir)
    hooks = load_hooks(config.templates_dir, list(templates))
    service = ProvisioningService(
        registry,
        CertificateAuthority.load(pki),
        templates,
        hooks,
        ProvisioningSettings(
            device_validity=config.device_validity,
            token_lifetime=dt.timedelta(seconds=config.token_lifetime_seconds),
            min_renewal_interval=dt.timedelta(seconds=config.min_renewal_interval_seconds),
            allow_server_generated_keys=config.allow_create_keys,
            reserved_thing_names=frozenset({config.services_client_id}),
        ),
    )

    def handle(request: Request, responder: Responder) -> None:
        topic, payload = service.handle(request.topic, request.payload, request.sender)
        responder.reply(request, topic, payload)

    for topic_filter in wire.PROVISIONING_REQUEST_FILTERS:
        services.route(topic_filter, handle, may_block=True)

    def first_connect(request: Request, responder: Responder) -> None:
        # Only the plugin can send this (devices may not publish on $fleet/...): the stamp is
        # the connection that has just proven a newly registered certificate works.
        if request.sender.role != "device":
            return
        retired = registry.certificate_connected(request.sender.certificate_id)
        for old in retired:
            log.info(
                "thing %s renewed its certificate: %s… retired (INACTIVE), %s… in use",
                request.sender.thing,
                old[:12],
                request.sender.certificate_id[:12],
            )
        if retired:
            # Nothing should still use the old certificate; if a copy does, it goes now.
            responder.publish(
                wire.CONTROL_TOPIC, "\n".join(f"kick-certificate {c}" for c in retired).encode()
            )

    services.route(wire.FIRST_CONNECT_TOPIC, first_connect)

    def purge() -> None:
        removed = registry.purge_expired(dt.datetime.now(dt.timezone.utc))
        if removed:
            log.info("removed %d certificate(s) never activated in time", len(removed))

    services.every(60, purge)
    log.info("provisioning: templates %s", ", ".join(sorted(templates)) or "(none)")


def install_shadow(services: FleetServices, registry: SQLiteRegistry) -> None:
    """Device Shadow: handled inline in arrival order, a batch per storage transaction, so one
    thing's updates never race and each reply follows its commit."""
    service = ShadowService(registry)

    def handle(requests: list[Request], responder: Responder) -> None:
        service.handle_batch([(r.topic, r.payload, r.sender) for r in requests], responder.publish)

    for topic_filter in wire.shadow_request_filters("+"):
        services.route_batch(topic_filter, handle)


def _write_ready(path: Path) -> None:
    write_atomic(path, json.dumps({"pid": os.getpid(), "since": time.time()}).encode(), 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.services")
    parser.add_argument("--dir", type=Path, default=Path("certs"))
    parser.add_argument("--config", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--bind")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.dir, args.config, port=args.port, bind_address=args.bind)
    except ConfigError as exc:
        print(f"fleet-services: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if config.log_level == "debug" else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    services = FleetServices(config)
    try:
        registry = SQLiteRegistry.open(PkiPaths(config.pki_dir).registry)
        install_provisioning(services, config, registry)
        install_shadow(services, registry)
        services.publish_stats()
    except (TemplateLoadError, HookConfigError, PkiError) as exc:
        log.error("%s", exc)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: services.stop())
    signal.signal(signal.SIGINT, lambda *_: services.stop())
    try:
        services.run()
    except ConnectError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
