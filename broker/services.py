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
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import wire
from broker.config import BrokerConfig, ConfigError, load_config
from broker.mosquitto import RunFiles
from broker.mqtt import ConnectError, connect, tls_context
from broker.pki import PkiPaths

log = logging.getLogger("fleet.services")

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Sender:
    """Who sent a request, as the broker plugin attests it."""

    client_id: str
    connection: str
    role: str
    certificate_id: str
    thing: str | None


@dataclass(frozen=True)
class Request:
    topic: str
    payload: bytes
    sender: Sender


def sender_of(message: mqtt.MQTTMessage) -> Sender | None:
    user = dict(getattr(message.properties, "UserProperty", None) or [])
    try:
        return Sender(
            client_id=user[wire.PROPERTY_CLIENT_ID],
            connection=user[wire.PROPERTY_CONNECTION],
            role=user[wire.PROPERTY_ROLE],
            certificate_id=user[wire.PROPERTY_CERTIFICATE_ID],
            thing=user.get(wire.PROPERTY_THING),
        )
    except KeyError:
        return None


class Responder:
    def __init__(self, client: mqtt.Client) -> None:
        self._client = client

    def reply(self, request: Request, topic: str, document: dict[str, object]) -> None:
        """Deliver to the connection that sent ``request`` only (QoS 1)."""
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [
            (wire.PROPERTY_REPLY_TO, request.sender.client_id),
            (wire.PROPERTY_CONNECTION, request.sender.connection),
        ]
        self._client.publish(topic, json.dumps(document), qos=1, properties=properties)

    def publish(self, topic: str, document: dict[str, object]) -> None:
        """An ordinary publish: every subscriber the policy lets receive it gets it."""
        self._client.publish(topic, json.dumps(document), qos=1)


Handler = Callable[[Request, Responder], None]


class FleetServices:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.files = RunFiles(config.run_dir)
        self._routes: list[tuple[str, Handler]] = []
        self._stop = threading.Event()
        self._unrouted: set[str] = set()

    def route(self, topic_filter: str, handler: Handler) -> None:
        self._routes.append((topic_filter, handler))

    def stop(self) -> None:
        self._stop.set()

    def _on_message(
        self, client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        sender = sender_of(message)
        if sender is None:
            log.warning("dropped a message on %s without broker identity", message.topic)
            return
        request = Request(message.topic, message.payload, sender)
        for topic_filter, handler in self._routes:
            if mqtt.topic_matches_sub(topic_filter, message.topic):
                try:
                    handler(request, Responder(client))
                except Exception:  # one bad request must never stop the service
                    log.exception("handler for %s failed", message.topic)
                return
        if message.topic not in self._unrouted:
            self._unrouted.add(message.topic)
            log.warning("no service handles %s yet", message.topic)

    def run(self) -> None:
        pki = PkiPaths(self.config.pki_dir)
        client = connect(
            self.config.connect_host,
            self.config.port,
            context=tls_context(pki.ca_cert, pki.service_cert, pki.service_key),
            client_id=self.config.services_client_id,
            clean_start=False,
            session_expiry=SESSION_EXPIRY_SECONDS,
            on_message=self._on_message,
        )
        client.reconnect_delay_set(0.2, 5)
        _write_ready(self.files.services_ready)
        log.info("connected as %s; ready", self.config.services_client_id)
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            client.disconnect()
            client.loop_stop()
            self.files.services_ready.unlink(missing_ok=True)


def _write_ready(path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"pid": os.getpid(), "since": time.time()}))
    os.replace(temporary, path)


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
