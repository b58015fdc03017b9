"""One flooding connection against everybody else's requests, with and without the request quota.

Before the per-connection quota of the broker plugin (broker.toml `[limits]`), one device
sending shadow updates as fast as it could filled the services' single MQTT session (Mosquitto's
max_queued_messages 10000) and the broker dropped what did not fit: other devices' requests
then vanished without an answer. This bench shows it side by side, one fresh stack per case:

  off          `[limits] requests_per_second = 0`: no quota (the old behaviour);
  default      the default quota (100 requests/s, burst 100, disconnected after 1,000 requests
               over quota within 10 s);
  no-kick      the default quota with `flood_disconnect = 0`: the flooder stays connected and
               floods to the end (every request over quota is dropped by the plugin);
  csr-off      a claim floods malformed CSRs on $aws/certificates/create-from-csr/json, no quota;
  csr-default  the same with the default quota.

In each case a flooder (a device on its own thing, or a claim) publishes --flood messages
(default 60,000) with QoS 0 as fast as it can, from its own process (so its paho threads do not
share a GIL with the measuring side); it is subscribed to its replies, as a device SDK would be.
A victim device sends shadow get requests (QoS 1, each with its own clientToken) at a steady
--rate (default 20/s) from 1 s before the flood until --tail seconds (default 5) after the
flood's end: the flooder's disconnect, or the broker has read all of it (the PUBACK of a last
QoS 1 publish; when none comes within 5 s, and without the quota Mosquitto 2.0.11 as Debian
patches it drops even PUBACKs to a connection whose outgoing queue is full, the moment paho had
written everything). The victim counts an answer (get/accepted or get/rejected with its
clientToken) within --timeout (default 10 s) as answered, none as lost. Also: how many requests
the services received (their stats topic), and whether the flooder was disconnected.

Run:  .venv/bin/python bench/request_flood.py [--cases off,default,no-kick,csr-off,csr-default]
Results are printed and appended as one JSON line to bench/results/request_flood.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import wire
from bench._record import record
from tests.fleet import REPO, Fleet, running_fleet

QUOTA_OFF = "[limits]\nrequests_per_second = 0\n"
NO_KICK = "[limits]\nflood_disconnect = 0\n"
CSR_TOPIC = wire.create_certificate_from_csr()


@dataclass(frozen=True)
class Case:
    name: str
    broker_toml: str
    flooder: str  # "shadow": a device floods updates on its own thing; "csr": a claim, bad CSRs


CASES = {
    "off": Case("off", QUOTA_OFF, "shadow"),
    "default": Case("default", "", "shadow"),
    "no-kick": Case("no-kick", NO_KICK, "shadow"),
    "csr-off": Case("csr-off", QUOTA_OFF, "csr"),
    "csr-default": Case("csr-default", "", "csr"),
}


# ------------------------------------------------------------------ the flooder (own process)


def flood(
    port: int,
    ca: str,
    cert: str,
    key: str,
    client_id: str,
    kind: str,
    thing: str,
    count: int,
    go: Any,
    out: Any,
) -> None:
    """Connect, wait for ``go``, publish ``count`` QoS 0 requests as fast as paho takes them,
    then one QoS 1 (its PUBACK: the broker has read them all); report what happened on ``out``."""
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(context)
    client.reconnect_delay_set(600, 600)  # a disconnected flooder stays out for the bench
    connected, gone, acked = threading.Event(), threading.Event(), threading.Event()
    received = {"accepted": 0, "rejected_429": 0, "rejected_other": 0, "other": 0}
    state: dict[str, Any] = {"reason": None, "gone_after_s": None, "last_mid": None}
    started = [0.0]

    def on_message(_c, _u, m) -> None:
        if m.topic.endswith("/accepted"):
            received["accepted"] += 1
        elif m.topic.endswith("/rejected"):
            body = json.loads(m.payload)
            throttled = 429 in (body.get("code"), body.get("statusCode"))
            received["rejected_429" if throttled else "rejected_other"] += 1
        else:
            received["other"] += 1

    def on_disconnect(_c, _u, _flags, reason, _props) -> None:
        state["reason"] = str(reason)
        state["gone_after_s"] = round(time.perf_counter() - started[0], 2)
        gone.set()

    def on_publish(_c, _u, mid, _reason, _props) -> None:
        if mid == state["last_mid"]:
            acked.set()

    client.on_connect = lambda *_a: connected.set()
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, 60)
    client.loop_start()
    if not connected.wait(10):
        out.put({"error": "flooder could not connect"})
        return
    if kind == "shadow":
        topic = wire.shadow_topic(thing, "update")
        client.subscribe(wire.thing_filter(thing), 0)

        def body(i: int) -> bytes:
            return b'{"state":{"reported":{"n":%d}},"clientToken":"f%d"}' % (i, i)
    else:
        topic = CSR_TOPIC
        client.subscribe(f"{CSR_TOPIC}/+", 0)

        def body(i: int) -> bytes:
            return b'{"certificateSigningRequest":"not a CSR %d"}' % i

    time.sleep(0.5)  # the SUBACK
    out.put({"ready": True})
    go.wait()
    started[0] = time.perf_counter()
    handed = 0
    for i in range(count):
        if gone.is_set():
            break
        if client.publish(topic, body(i), qos=0).rc == mqtt.MQTT_ERR_SUCCESS:
            handed += 1
    handed_s = time.perf_counter() - started[0]
    # Written: paho's queue is empty (the rest is in the kernel's buffers, on loopback).
    while client._out_packet and not gone.is_set():  # (paho has no accessor)
        time.sleep(0.01)
    written_s = time.perf_counter() - started[0]
    # A last QoS 1 publish: its PUBACK says the broker has read everything before it.
    puback_s = None
    if not gone.is_set():
        info = client.publish(topic, body(count), qos=1)
        state["last_mid"] = info.mid
        if info.rc == mqtt.MQTT_ERR_SUCCESS and (acked.wait(5) or acked.is_set()):
            puback_s = round(time.perf_counter() - started[0], 2)
    flood_s = state["gone_after_s"] if gone.is_set() else (puback_s or round(written_s, 2))
    out.put({"done": True, "flood_seconds": flood_s})
    time.sleep(3)  # take in the last replies
    # Is the flooder itself still served? One more request, and any answer to it within 5 s.
    served_after = None
    if not gone.is_set():
        before = sum(received.values())
        probe = (
            (wire.shadow_topic(thing, "get"), b'{"clientToken":"after"}')
            if kind == "shadow"
            else (CSR_TOPIC, b'{"certificateSigningRequest":"after"}')
        )
        client.publish(*probe, qos=0)
        deadline = time.perf_counter() + 5
        while sum(received.values()) == before and time.perf_counter() < deadline:
            time.sleep(0.05)
        served_after = sum(received.values()) > before
    kicked = gone.is_set()
    out.put(
        {
            "published": handed,  # handed to paho; after a disconnect its queue is dropped
            "publish_seconds": round(handed_s, 2),
            "written_s": None if kicked else round(written_s, 2),
            "puback_after_s": puback_s,  # None: no PUBACK for the last (QoS 1) publish in 5 s
            "disconnected": kicked,
            "disconnect_reason": state["reason"] if kicked else None,
            "disconnected_after_s": state["gone_after_s"] if kicked else None,
            "replies": received,
            "answered_after_flood": served_after,
        }
    )
    # (No loop_stop first: paho's loop waits for the PUBACK of an unacknowledged QoS 1 publish.)
    if not kicked:
        client.disconnect()
    client.loop_stop()


# --------------------------------------------------------------------------- the victim


class Victim:
    """A device sending shadow gets at a steady pace; answers matched by clientToken."""

    def __init__(self, fleet: Fleet, thing: str) -> None:
        self.thing = thing
        self.client = fleet.client(fleet.device(thing), thing)
        assert self.client.accepted, self.client.connack
        self.sent: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.outcomes: dict[str, int] = {}
        self.lock = threading.Lock()
        self.client.paho.on_message = self._on_message
        self.client.subscribe(f"{wire.shadow_topic(thing, 'get')}/+", qos=0)
        self.client.subscribe(wire.shadow_reply(thing, "update", "accepted"), qos=0)
        created = threading.Event()
        self._created = created
        # A shadow to get (otherwise every get is a 404: still an answer, but not the usual one).
        self.client.paho.publish(
            wire.shadow_topic(thing, "update"),
            json.dumps({"state": {"reported": {"ok": True}}}),
            qos=1,
        )
        assert created.wait(5), "the victim's shadow was not created"

    def _on_message(self, _c, _u, m: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if m.topic.endswith("/update/accepted"):
            self._created.set()
            return
        token = json.loads(m.payload).get("clientToken")
        outcome = "accepted" if m.topic.endswith("/accepted") else "rejected"
        code = json.loads(m.payload).get("code") if outcome == "rejected" else None
        with self.lock:
            if token in self.sent and token not in self.answered:
                self.answered[token] = now - self.sent[token]
                key = outcome if code is None else f"rejected_{code}"
                self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def run(self, rate: float, stop: threading.Event, until: list[float]) -> None:
        """Send at ``rate`` until ``stop`` is set and then until ``until[0]``."""
        topic = wire.shadow_topic(self.thing, "get")
        interval = 1.0 / rate
        start = time.perf_counter()
        i = 0
        while not (stop.is_set() and time.perf_counter() >= until[0]):
            time.sleep(max(0.0, start + i * interval - time.perf_counter()))
            token = f"victim-{i}"
            with self.lock:
                self.sent[token] = time.perf_counter()
            self.client.paho.publish(topic, json.dumps({"clientToken": token}), qos=1)
            i += 1

    def wait_answers(self, timeout: float) -> None:
        deadline = max(self.sent.values()) + timeout
        while time.perf_counter() < deadline:
            with self.lock:
                if len(self.answered) == len(self.sent):
                    return
            time.sleep(0.05)

    def summary(self, timeout: float) -> dict[str, Any]:
        with self.lock:
            ms = sorted(s * 1000 for s in self.answered.values() if s <= timeout)
            late = len(self.answered) - len(ms)
            sent = len(self.sent)
            outcomes = dict(self.outcomes)

        def pct(share: float) -> float:
            return round(ms[min(len(ms) - 1, int(share * len(ms)))], 1) if ms else float("nan")

        return {
            "sent": sent,
            "answered": len(ms),
            "lost": sent - len(ms),
            "of_which_answered_late": late,  # after the timeout, before the case ended
            "over_100_ms": sum(1 for m in ms if m > 100),
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": round(ms[-1], 1) if ms else float("nan"),
            "outcomes": outcomes,
        }


def services_stats(fleet: Fleet) -> dict[str, Any]:
    """The services' own stats (requests_received, queue depths) from their stats topic."""
    reader = fleet.client(fleet.service, wire.operator_client_id("bench-stats"))
    try:
        reader.subscribe(wire.SERVICE_STATS_TOPIC)
        message = reader.received.wait_for(lambda m: m.topic == wire.SERVICE_STATS_TOPIC, 5)
        assert message is not None, "no stats from the services"
        return json.loads(message.payload)
    finally:
        reader.stop()


def broker_log_counts(fleet: Fleet) -> dict[str, int]:
    """Lines of the broker's log that tell of dropped messages, throttling and kicks."""
    text = Path(fleet.stack.files.log).read_text(errors="replace")
    needles = {
        "dropping": "Outgoing messages are being dropped",
        "throttling": "throttling '",
        "disconnecting": "disconnecting '",
    }
    return {name: text.count(needle) for name, needle in needles.items()}


# ------------------------------------------------------------------------------ one case


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with running_fleet(services=True, broker_toml=case.broker_toml) as fleet:
        victim = Victim(fleet, "victim-0001")
        if case.flooder == "shadow":
            thing, client_id = "flooder-0001", "flooder-0001"
            creds = fleet.device(thing)
        else:
            thing, client_id = "", f"{wire.CLAIM_CLIENT_ID_PREFIX}flooder-0001"
            creds = fleet.claim
        go, out = ctx.Event(), ctx.Queue()
        flooder = ctx.Process(
            target=flood,
            args=(
                fleet.config.port,
                str(fleet.pki.ca_cert),
                str(creds.cert),
                str(creds.key),
                client_id,
                case.flooder,
                thing,
                args.flood,
                go,
                out,
            ),
            daemon=True,
        )
        flooder.start()
        ready = out.get(timeout=30)
        if "error" in ready:
            raise RuntimeError(ready["error"])
        before = services_stats(fleet)["requests_received"]

        stop, until = threading.Event(), [float("inf")]
        sender = threading.Thread(target=victim.run, args=(args.rate, stop, until), daemon=True)
        sender.start()
        time.sleep(1.0)
        go.set()
        done = out.get(timeout=args.max_flood_seconds)
        until[0] = time.perf_counter() + args.tail
        stop.set()
        sender.join()
        victim.wait_answers(args.timeout)
        report = out.get(timeout=30)
        flooder.join(10)
        if flooder.is_alive():
            flooder.kill()
        time.sleep(1.5)  # the next stats message counts everything received so far
        stats = services_stats(fleet)
        logs = broker_log_counts(fleet)
        return {
            "case": case.name,
            "flooder_kind": case.flooder,
            "broker_toml": case.broker_toml.strip().replace("\n", "; ") or "(defaults)",
            "flood_seconds": done["flood_seconds"],
            "victim": victim.summary(args.timeout),
            "services_received": stats["requests_received"] - before,
            "services_stats_after": {k: v for k, v in stats.items() if k != "at"},
            "flooder": report,
            "broker_log": logs,
        }


def table(results: list[dict[str, Any]]) -> str:
    """The victim's view and the flood's, one row per case."""
    head = (
        f"{'case':<12} {'flood':<6} {'flood s':>7} | {'sent':>4} {'answd':>5} {'lost':>4} "
        f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'>100ms':>6} | {'svc rcvd':>8} "
        f"{'flooder':<14} {'flood 429s':>10} {'PUBACK':>6}"
    )
    rows = [
        f"{'':<28}| {'victim: shadow gets at a steady pace':<55}| services and flooder",
        head,
        "-" * len(head),
    ]
    for r in results:
        v, f = r["victim"], r["flooder"]
        if f["disconnected"]:
            flooder = f"kicked @{f['disconnected_after_s']}s"
        else:
            flooder = "connected" + ("" if f["answered_after_flood"] else ", mute")
        puback = "-" if f["disconnected"] else ("yes" if f["puback_after_s"] else "LOST")
        rows.append(
            f"{r['case']:<12} {r['flooder_kind']:<6} {r['flood_seconds'] or float('nan'):>7} | "
            f"{v['sent']:>4} {v['answered']:>5} {v['lost']:>4} {v['p50_ms']:>7} {v['p90_ms']:>7} "
            f"{v['p99_ms']:>7} {v['max_ms']:>7} {v['over_100_ms']:>6} | "
            f"{r['services_received']:>8} {flooder:<14} "
            f"{f['replies']['rejected_429']:>10} {puback:>6}"
        )
    rows += [
        "flood s: until the flooder was kicked, else until its last publish was acknowledged "
        "(or written);",
        "lost: no answer within the timeout; svc rcvd: requests the services received during "
        "the case (the victim's included);",
        "flood 429s: throttled answers the flooder read (a kick's reset discards what it had not "
        "read yet); PUBACK: of its last, QoS 1, publish",
    ]
    return "\n".join(rows)


def commit() -> str:
    """HEAD, and "+dirty" when the working tree has changes (the plugin is built from it)."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="off,default,no-kick,csr-off,csr-default")
    parser.add_argument("--flood", type=int, default=60_000, help="requests the flooder sends")
    parser.add_argument("--rate", type=float, default=20, help="victim requests per second")
    parser.add_argument("--tail", type=float, default=5, help="victim seconds after the flood")
    parser.add_argument("--timeout", type=float, default=10, help="seconds before 'lost'")
    parser.add_argument("--max-flood-seconds", type=float, default=90)
    parser.add_argument("--no-record", action="store_true", help="print only, append nothing")
    args = parser.parse_args()
    results = []
    for name in args.cases.split(","):
        started = time.perf_counter()
        result = run_case(CASES[name], args)
        results.append(result)
        print(f"{name}: {json.dumps(result)}  ({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print(table(results))
    if not args.no_record:
        record(
            "request_flood",
            {
                "commit": commit(),
                "flood": args.flood,
                "victim_rate": args.rate,
                "lost_after_s": args.timeout,
                "cases": results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
