"""Device Shadow service throughput and round-trip latency on this machine.

Starts the whole local stack (Mosquitto + plugin + services) on a free port with a throw-away
PKI, connects N devices over mutual TLS (MQTT 5 sessions of agent/session.py, all on one asyncio
loop: the load generator shares the cores with the broker and the services, and a paho thread
per device cost it more than the service it measures), and measures device publish (QoS 1) ->
/update/accepted received:

  1. saturation: every device keeps a window of updates in flight; updates/s is the service's
     throughput (the broker, the services and this load generator share the machine's cores);
  2. paced: a fixed total rate (default 1,000/s) spread over the devices; p50/p90/p99/max RTT.

The broker side runs with the plugin's request quota off (broker.toml `[limits]
requests_per_second = 0`): saturated, each device sends more than the default 100 requests/s.

Run:  .venv/bin/python bench/shadow_throughput.py [--devices 40] [--seconds 10] [--rate 1000]
Results are printed and appended as JSON to bench/results/shadow_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import wire
from agent.session import Message, Session, connect
from bench._record import record
from tests.fleet import Fleet, running_fleet

QUOTA_OFF = "[limits]\nrequests_per_second = 0\n"  # broker.toml: no per-connection quota


class Device:
    def __init__(self, session: Session, thing: str) -> None:
        self.thing = thing
        self.session = session
        self.topic = wire.shadow_topic(thing, "update")
        self.sent: dict[str, float] = {}
        self.rtts: list[float] = []
        self.counter = 0
        self.errors = 0
        self.on_accepted: Callable[[Device], None] | None = None
        session.route(wire.shadow_reply(thing, "update", "accepted"), self._accepted)

    @classmethod
    async def connect(cls, fleet: Fleet, thing: str) -> Device:
        session = await connect(
            "127.0.0.1", fleet.config.port, client_id=thing, context=fleet.tls(fleet.device(thing))
        )
        await session.subscribe(wire.shadow_reply(thing, "update", "accepted"), qos=0)
        return cls(session, thing)

    def _accepted(self, message: Message) -> None:
        now = time.perf_counter()
        started = self.sent.pop(json.loads(message.payload).get("clientToken"), None)
        if started is not None:
            self.rtts.append(now - started)
        if self.on_accepted is not None:
            self.on_accepted(self)

    def send(self) -> None:
        self.counter += 1
        token = f"{self.thing}-{self.counter}"
        body = json.dumps(
            {
                "state": {"reported": {"temperature": 20 + self.counter % 7, "n": self.counter}},
                "clientToken": token,
            }
        ).encode()
        self.sent[token] = time.perf_counter()
        published = asyncio.ensure_future(self.session.publish(self.topic, body))
        published.add_done_callback(self._published)

    def _published(self, published: asyncio.Future[None]) -> None:
        if published.cancelled() or published.exception() is not None:
            self.errors += 1


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


async def saturate(devices: list[Device], seconds: float, window: int) -> dict[str, float]:
    for d in devices:
        d.rtts.clear()
    stop = time.perf_counter() + seconds

    def next_update(d: Device) -> None:  # an answer frees a slot of the device's window
        if time.perf_counter() < stop:
            d.send()

    started = time.perf_counter()
    for d in devices:
        d.on_accepted = next_update
        for _ in range(window):
            d.send()
    await asyncio.sleep(stop - time.perf_counter() + 1.0)  # and let the last replies land
    elapsed = time.perf_counter() - started
    for d in devices:
        d.on_accepted = None
    rtts = [r for d in devices for r in d.rtts]
    return {
        "updates": len(rtts),
        "seconds": round(elapsed - 1.0, 2),
        "updates_per_second": round(len(rtts) / (elapsed - 1.0), 1),
        "p50_ms": round(statistics.median(rtts) * 1000, 2) if rtts else float("nan"),
        "p99_ms": round(percentile(rtts, 0.99) * 1000, 2),
    }


async def paced(devices: list[Device], seconds: float, rate: float) -> dict[str, float]:
    for d in devices:
        d.rtts.clear()
    interval = 1.0 / rate
    total = int(rate * seconds)
    started = time.perf_counter()
    for i in range(total):
        # Always yield to the loop, so replies are taken in as they arrive.
        await asyncio.sleep(max(0.0, started + i * interval - time.perf_counter()))
        devices[i % len(devices)].send()
    send_elapsed = time.perf_counter() - started
    await asyncio.sleep(1.5)
    rtts = [r for d in devices for r in d.rtts]
    lost = total - len(rtts)
    ms = [r * 1000 for r in rtts]
    return {
        "target_rate": rate,
        "achieved_send_rate": round(total / send_elapsed, 1),
        "updates": len(rtts),
        "lost": lost,
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p90_ms": round(percentile(ms, 0.90), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2) if ms else 0,
    }


async def measure(fleet: Fleet, args: argparse.Namespace) -> dict[str, object]:
    devices = [await Device.connect(fleet, f"bench-{i:04d}") for i in range(args.devices)]
    try:
        for d in devices:  # create every shadow first: measure steady state, not creation
            d.send()
        await asyncio.sleep(1)
        saturation = await saturate(devices, args.seconds, args.window)
        print(f"saturation: {saturation}")
        pace = await paced(devices, args.seconds, args.rate)
        print(f"paced:      {pace}")
        errors = sum(d.errors for d in devices)
        if errors:
            print(f"{errors} publish(es) failed")
    finally:
        await asyncio.gather(*(d.session.disconnect() for d in devices))
    return {"saturation": saturation, "paced": pace}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--window", type=int, default=8, help="in-flight updates per device")
    parser.add_argument("--no-record", action="store_true", help="print only, append nothing")
    args = parser.parse_args()
    # The broker plugin's per-connection request quota off: this measures the services'
    # capacity, not the quota. Saturated, 40 devices send ~107 updates/s each, over the default
    # quota of 100/s, and a throttled update (a 429 on update/rejected, which no device here
    # listens to) would leave its slot of the window empty for good. Same devices and window as
    # the earlier runs in bench/results/shadow_throughput.jsonl, so the figures stay comparable.
    with running_fleet(services=True, broker_toml=QUOTA_OFF) as fleet:
        result = asyncio.run(measure(fleet, args))
    if not args.no_record:
        record(
            "shadow_throughput",
            {"devices": args.devices, "window": args.window, "quota": "off", **result},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
