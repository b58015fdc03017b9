"""How long one device takes to onboard by claim, end to end, with the real agent code.

Starts the whole local stack on a free port with a throw-away PKI, then onboards devices one
after another with agent.onboarding.onboard: claim connect (mutual TLS) -> subscribe ->
CreateCertificateFromCsr -> RegisterThing -> keys and certificate written atomically ->
reconnect with the new certificate and prove it (CONNACK + SUBACK). Reports the median and
percentiles over N devices (default 100).

Run:  .venv/bin/python bench/provisioning_time.py [--devices 100]
Results are printed and appended as JSON to bench/results/provisioning_time.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.keystore import Keystore
from agent.onboarding import ClaimSettings, onboard
from agent.session import tls_context
from bench._record import latency_summary, record
from tests.fleet import Fleet, running_fleet


async def run(fleet: Fleet, count: int) -> list[float]:
    settings_base = {
        "endpoint": "localhost",
        "port": fleet.config.port,
        "ca_file": fleet.pki.ca_cert,
        "claim_context": tls_context(fleet.pki.ca_cert, fleet.pki.claim_cert, fleet.pki.claim_key),
    }
    durations = []
    for i in range(count):
        settings = ClaimSettings(**settings_base, parameters={"SerialNumber": f"BENCH-{i:05d}"})
        keystore = Keystore(fleet.workdir / "devices" / f"{i:05d}")
        started = time.perf_counter()
        await onboard(settings, keystore)
        durations.append(time.perf_counter() - started)
    return durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    args = parser.parse_args()
    with running_fleet(services=True) as fleet:
        durations = asyncio.run(run(fleet, args.devices))
    record("provisioning_time", {"devices": args.devices, **latency_summary(durations)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
