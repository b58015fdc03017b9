"""Device Shadow service throughput and round-trip latency on this machine.

Starts the whole local stack (Mosquitto + plugin + services) on a free port with a throw-away
PKI, connects N devices over mutual TLS (paho-mqtt, one network thread each), and measures
device publish -> /update/accepted received:

  1. saturation: every device keeps a window of updates in flight; updates/s is the service's
     throughput (the broker, the services and this load generator share the machine's cores);
  2. paced: a fixed total rate (default 1,000/s) spread over the devices; p50/p90/p99/max RTT.

Run:  .venv/bin/python bench/shadow_throughput.py [--devices 40] [--seconds 10] [--rate 1000]
Results are printed and appended as JSON to bench/results/shadow_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import wire
from bench._record import record
from tests.fleet import Fleet, running_fleet


class Device:
    def __init__(self, fleet: Fleet, thing: str) -> None:
        self.thing = thing
        self.topic = wire.shadow_topic(thing, "update")
        self.sent: dict[str, float] = {}
        self.rtts: list[float] = []
        self.lock = threading.Lock()
        self.window = threading.Semaphore(1)
        self.client = fleet.client(fleet.device(thing), thing)
        self.client.paho.on_message = self._on_message
        self.client.subscribe(wire.shadow_reply(thing, "update", "accepted"), qos=0)
        self.counter = 0
        self.errors = 0

    def _on_message(self, _c: object, _u: object, message) -> None:
        now = time.perf_counter()
        token = json.loads(message.payload).get("clientToken")
        with self.lock:
            started = self.sent.pop(token, None)
            if started is not None:
                self.rtts.append(now - started)
        self.window.release()

    def send(self) -> None:
        self.counter += 1
        token = f"{self.thing}-{self.counter}"
        body = json.dumps(
            {
                "state": {"reported": {"temperature": 20 + self.counter % 7, "n": self.counter}},
                "clientToken": token,
            }
        )
        with self.lock:
            self.sent[token] = time.perf_counter()
        info = self.client.paho.publish(self.topic, body, qos=1)
        if info.rc != 0:
            self.errors += 1


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def saturate(devices: list[Device], seconds: float, window: int) -> dict[str, float]:
    for d in devices:
        d.rtts.clear()
        d.window = threading.Semaphore(window)
    stop = time.perf_counter() + seconds

    def run(d: Device) -> None:
        while time.perf_counter() < stop:
            if d.window.acquire(timeout=1):
                d.send()

    threads = [threading.Thread(target=run, args=(d,)) for d in devices]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)  # let the last replies land
    elapsed = time.perf_counter() - started
    rtts = [r for d in devices for r in d.rtts]
    return {
        "updates": len(rtts),
        "seconds": round(elapsed - 1.0, 2),
        "updates_per_second": round(len(rtts) / (elapsed - 1.0), 1),
        "p50_ms": round(statistics.median(rtts) * 1000, 2) if rtts else float("nan"),
        "p99_ms": round(percentile(rtts, 0.99) * 1000, 2),
    }


def paced(devices: list[Device], seconds: float, rate: float) -> dict[str, float]:
    for d in devices:
        d.rtts.clear()
        d.window = threading.Semaphore(10_000)
    interval = 1.0 / rate
    total = int(rate * seconds)
    started = time.perf_counter()
    for i in range(total):
        target = started + i * interval
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        devices[i % len(devices)].send()
    send_elapsed = time.perf_counter() - started
    time.sleep(1.5)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--window", type=int, default=8, help="in-flight updates per device")
    args = parser.parse_args()
    with running_fleet(services=True) as fleet:
        devices = [Device(fleet, f"bench-{i:04d}") for i in range(args.devices)]
        for d in devices:  # create every shadow first: measure steady state, not creation
            d.send()
        time.sleep(1)
        saturation = saturate(devices, args.seconds, args.window)
        print(f"saturation: {saturation}")
        pace = paced(devices, args.seconds, args.rate)
        print(f"paced:      {pace}")
    record(
        "shadow_throughput",
        {
            "devices": args.devices,
            "window": args.window,
            "saturation": saturation,
            "paced": pace,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
