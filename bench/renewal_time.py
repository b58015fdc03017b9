"""How long a certificate renewal takes, end to end, with the real agent code.

Starts the whole local stack on a free port with a throw-away PKI, onboards one device, then
renews its certificate N times in a row as `fleet-agent renew` does without a daemon
(agent.device.renew_once): connect with the current certificate -> new key and CSR ->
CreateCertificateFromCsr -> RegisterThing (as the thing itself) -> staged files written and
fsynced -> connect with the new certificate (CONNACK + SUBACK) -> switch. Also reports how long
the broker side took to retire the old certificate after the new one connected.

Run:  .venv/bin/python bench/renewal_time.py [--renewals 50]
Results are printed and appended as JSON to bench/results/renewal_time.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import load_config
from agent.device import Device, renew_once
from agent.keystore import Keystore
from bench._record import latency_summary, record
from broker.registry import CertificateStatus
from tests.fleet import Fleet, agent_config, fleet_agent, running_fleet


def retired_after(fleet: Fleet, certificate_id: str, since: float) -> float:
    while True:
        with fleet.registry() as registry:
            record_ = registry.get_certificate(certificate_id)
        if record_ is not None and record_.status is CertificateStatus.INACTIVE:
            return time.perf_counter() - since
        time.sleep(0.002)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renewals", type=int, default=50)
    args = parser.parse_args()
    renewals, retirements = [], []
    # Renewals back to back: lift the broker's pace limit (one renewal a minute per device).
    no_pace = "[certificates]\nmin_renewal_interval_seconds = 0\n"
    with running_fleet(services=True, broker_toml=no_pace) as fleet:
        path = agent_config(fleet, "BENCH-RENEW")
        proc = fleet_agent("provision", "--config", str(path))
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        config = load_config(path)
        keystore = Keystore(config.agent.state_dir)
        for _ in range(args.renewals):
            provisioned = keystore.provisioned()
            assert provisioned is not None
            old = provisioned.record.certificate_id
            started = time.perf_counter()
            asyncio.run(renew_once(Device(config, keystore, provisioned)))
            done = time.perf_counter()
            renewals.append(done - started)
            retirements.append(retired_after(fleet, old, done))
    record(
        "renewal_time",
        {
            "renewals": args.renewals,
            **latency_summary(renewals),
            **latency_summary(retirements, prefix="old_retired_after_switch_"),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
