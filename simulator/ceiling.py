"""The ceiling an onboarding rate is judged against: bare mutual-TLS connects per second.

Before the fleet arrives, each worker process opens and closes connections with the claim
identity as fast as its share of the concurrency cap allows: TCP connect, TLS handshake with
both certificates verified, MQTT CONNECT -> CONNACK, DISCONNECT. Nothing else happens on them,
so the rate is what the broker (and this simulator, on the same cores) can do at most for the
first step of every onboarding; an onboarding makes two such connections plus its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

from agent.session import SessionError, connect
from simulator.virtual_device import Recorder, Target, error_kind

STEP = "ceiling_connect"


async def measure_connect_ceiling(
    target: Target,
    context: ssl.SSLContext,
    *,
    until: float,
    concurrency: int,
    recorder: Recorder,
    client_prefix: str,
) -> int:
    """Connect and disconnect in a loop until the wall clock reaches ``until``; return how
    many connects completed. Each is recorded as ``ceiling_connect``; failures by kind."""
    done = 0
    serial = 0

    async def loop() -> None:
        nonlocal done, serial
        while time.time() < until:
            serial += 1
            started = time.perf_counter()
            try:
                session = await connect(
                    target.endpoint,
                    target.port,
                    client_id=f"{client_prefix}-{serial}",
                    context=context,
                    timeout=target.timeout,
                )
            except SessionError as exc:
                recorder.error(STEP, error_kind(exc), message=str(exc))
                await asyncio.sleep(0.1)  # a refusing broker is not a reason to spin
                continue
            if time.time() <= until:  # only connects that finished inside the window count
                recorder.observe(STEP, time.perf_counter() - started)
                done += 1
            with contextlib.suppress(SessionError):
                await session.disconnect(timeout=2)

    await asyncio.gather(*(loop() for _ in range(max(1, concurrency))))
    return done
