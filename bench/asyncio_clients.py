"""Which asyncio MQTT client the simulator should use: aiomqtt or agent/session.py, measured.

aiomqtt runs paho's blocking ``connect()`` (TCP connect and TLS handshake) in the event loop's
default thread pool (min(32, cores + 4) threads), so at most that many handshakes can be in
flight per process however many devices are connecting. agent/session.py does TCP and TLS on
the event loop itself. This script connects N clients at once with each, over mutual TLS to
the local broker (Mosquitto + plugin, claim identity, MQTT 5), directly and through a proxy
that adds network latency (``--latency-ms`` each way, the case of devices far from the
broker), and records connects/s and connect latency. The proxy runs on the same event loop
(both clients pay for it alike). Memory per connection is measured by bench/sim_memory.py.

Run:  .venv/bin/pip install aiomqtt   (or: pip install -e '.[bench]')
      .venv/bin/python bench/asyncio_clients.py [--clients 500] [--latency-ms 50]
Results are printed and appended as JSON to bench/results/asyncio_clients.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.session import connect
from bench._record import latency_summary, record
from tests.fleet import running_fleet

Connector = Callable[[int], Awaitable[Any]]


async def delay_proxy(target_port: int, delay: float) -> tuple[asyncio.Server, int]:
    """A TCP proxy on loopback that delivers every chunk ``delay`` seconds late, each way."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def measure(name: str, connector: Connector, clients: int) -> dict[str, Any]:
    latencies: list[float] = []

    async def one(index: int) -> Any:
        started = time.perf_counter()
        handle = await connector(index)
        latencies.append(time.perf_counter() - started)
        return handle

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(clients)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    held = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r)[:120] for r in results if isinstance(r, BaseException)]
    result = {
        "client": name,
        "connected": len(held),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "connects_per_s": round(len(held) / elapsed, 1),
        **(latency_summary(latencies, "connect_") if latencies else {}),
    }
    return {"result": result, "handles": held}


async def compare(clients: int, latency_ms: float) -> list[dict[str, Any]]:
    import aiomqtt

    results = []
    with running_fleet(services=False) as fleet:
        context: ssl.SSLContext = fleet.tls(fleet.claim)
        server, proxy_port = await delay_proxy(fleet.config.port, latency_ms / 1000)
        routes = [("loopback", fleet.config.port, 0.0), ("latency", proxy_port, latency_ms)]
        for route, port, delay in routes:

            async def ours(i: int, port: int = port, route: str = route) -> Any:
                return await connect(
                    "localhost", port, client_id=f"ours-{route}-{i}", context=context, timeout=120
                )

            async def theirs(i: int, port: int = port, route: str = route) -> Any:
                client = aiomqtt.Client(
                    "localhost",
                    port,
                    identifier=f"aiomqtt-{route}-{i}",
                    tls_context=context,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    timeout=120,
                )
                await client.__aenter__()
                return client

            for name, connector in (("agent.session", ours), ("aiomqtt", theirs)):
                measured = await measure(name, connector, clients)
                measured["result"].update(route=route, one_way_latency_ms=delay, clients=clients)
                results.append(measured["result"])
                print(measured["result"], flush=True)
                for handle in measured["handles"]:
                    with contextlib.suppress(Exception):
                        if name == "aiomqtt":
                            await handle.__aexit__(None, None, None)
                        else:
                            await handle.disconnect(timeout=5)
                await asyncio.sleep(1)
        server.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    try:
        import aiomqtt  # noqa: F401
    except ImportError:
        sys.exit("bench/asyncio_clients.py needs aiomqtt: pip install -e '.[bench]'")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # three sockets per proxied client
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = asyncio.run(compare(args.clients, args.latency_ms))
    record("asyncio_clients", {"clients": args.clients, "runs": results})


if __name__ == "__main__":
    main()
