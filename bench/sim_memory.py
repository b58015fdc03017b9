"""Where a simulated device's memory goes, layer by layer (the issue's target: <= 60 KB each).

Each layer is measured in a fresh process (so no layer reuses memory another freed) as the
growth of resident memory over N instances, after a warm-up of 20:

  context_bare     an empty client SSLContext (OpenSSL 3 SSL_CTX)
  context_ca       + the CA loaded for verifying the broker
  context_device   + the device's own key and certificate (what each device needs)
  tls_connection   a held mutual-TLS connection (one shared context)
  mqtt_session     a held agent.session MQTT 5 session (TLS included, one shared context)
  virtual_device   a whole fleet-sim device: own key and certificate on the process's one
                   shared context (simulator/shared_tls.py), onboarded through the claim
                   flow, its session and shadow sync live (the number fleet-sim reports)

Python's own share of a virtual device is measured in one more run (tracemalloc). Needs the
local stack: starts Mosquitto + plugin + services on a free port with a throw-away PKI.

Run:  .venv/bin/python bench/sim_memory.py [--count 1000]
Results are printed and appended as JSON to bench/results/sim_memory.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import ssl
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.session import connect, open_tls, tls_context
from bench._record import record
from simulator.metrics import Recorder
from simulator.virtual_device import Counters, Target, VirtualDevice

WARM_UP = 20
LAYERS = (
    "context_bare",
    "context_ca",
    "context_device",
    "tls_connection",
    "mqtt_session",
    "virtual_device",
)


def rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def contexts(layer: str, paths: dict[str, str]) -> ssl.SSLContext:
    if layer == "context_bare":
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if layer == "context_ca":
        return ssl.create_default_context(cafile=paths["ca"])
    return tls_context(paths["ca"], paths["cert"], paths["key"])


async def build(
    layer: str, paths: dict[str, str], port: int, count: int, trace: bool
) -> dict[str, Any]:
    held: list[Any] = []
    shared = tls_context(paths["ca"], paths["cert"], paths["key"])
    target = Target("localhost", port, Path(paths["ca"]))
    recorder, counters = Recorder(time.time()), Counters()
    limit = asyncio.Semaphore(50)

    async def make(index: int) -> Any:
        # 50 in flight, as onboarding with a concurrency cap: memory a handshake needs while
        # in flight is freed after it but stays in the allocator, and counts here.
        async with limit:
            if layer.startswith("context"):
                return contexts(layer, paths)
            if layer == "tls_connection":
                return await open_tls("localhost", port, shared, 30)
            if layer == "mqtt_session":
                return await connect("localhost", port, client_id=f"mem-{index}", context=shared)
            serial = f"MEM{'T' if trace else ''}-{index:06d}"  # a traced run: new things
            device = VirtualDevice(serial, target, shared, recorder, counters)
            await device.onboard()
            return device

    held += await asyncio.gather(*(make(i) for i in range(WARM_UP)))
    gc.collect()
    recorder.drain()
    before = rss_kb()
    if trace:
        tracemalloc.start()
    held += await asyncio.gather(*(make(i) for i in range(WARM_UP, WARM_UP + count)))
    gc.collect()
    recorder.drain()
    python_kb = tracemalloc.get_traced_memory()[0] / 1024 if trace else None
    grown = rss_kb() - before
    for item in held:
        if isinstance(item, VirtualDevice):
            await item.close()
        elif hasattr(item, "disconnect"):
            await item.disconnect(timeout=5)
        elif hasattr(item, "close"):
            item.close()
    return {
        "layer": layer,
        "count": count,
        **(
            {"python_heap_kb_each": round(python_kb / count, 1)}
            if python_kb
            else {"kb_each": round(grown / count, 1)}
        ),
    }


def measure_in_child(
    layer: str, paths: dict[str, str], port: int, count: int, trace: bool = False
) -> dict:
    command = [sys.executable, __file__, "--layer", layer, "--port", str(port)]
    command += ["--count", str(count), *(["--trace"] if trace else [])]
    out = subprocess.run(
        command,
        input=json.dumps(paths),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--layer", choices=LAYERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layer:  # the child: one layer, result as the last line
        paths = json.loads(sys.stdin.read())
        result = asyncio.run(build(args.layer, paths, args.port, args.count, args.trace))
        print(json.dumps(result))
        return

    from tests.fleet import running_fleet

    layers = []
    with running_fleet(services=True) as fleet:
        paths = {
            "ca": str(fleet.pki.ca_cert),
            "cert": str(fleet.pki.claim_cert),
            "key": str(fleet.pki.claim_key),
        }
        for layer in LAYERS:
            layers.append(measure_in_child(layer, paths, fleet.config.port, args.count))
            print(layers[-1], flush=True)
        # Python's own share of a device, traced in a run of its own (tracing adds memory).
        python = measure_in_child("virtual_device", paths, fleet.config.port, args.count, True)
        print(python, flush=True)
    by_layer = {entry["layer"]: entry for entry in layers}
    record(
        "sim_memory",
        {
            "count": args.count,
            "layers": layers,
            "virtual_device_python_heap_kb": python["python_heap_kb_each"],
            # What one device's TLS costs before any MQTT: its connection. Its own context
            # (context_device) is no longer paid: the devices of a process share one.
            "context": "shared",
            "tls_per_device_kb": by_layer["tls_connection"]["kb_each"],
        },
    )


if __name__ == "__main__":
    main()
