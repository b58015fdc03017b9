"""`fleet-sim demo`: a local fleet onboarding and shadow demo with an end report.

Everything runs on the real code paths, on this machine:
1. a fresh PKI and registry, then the broker side (Mosquitto with the plugin, the fleet
   services) on a free port, as `fleet-broker init` and `up` do;
2. the fleet onboards through Fleet Provisioning with the one shared claim certificate: one
   real `fleet-agent run` process and N-1 virtual devices running the agent's own claim flow
   and shadow sync (simulator/virtual_device.py), each making its own key and CSR;
3. shadow traffic: every virtual device reports twice; the operator (the service identity)
   changes desired state for the agent and a quarter of the fleet and watches it come back
   reported;
4. the attacks the plugin exists to stop, and the revocation of one device;
5. everything it started is stopped, and the report says what happened and how long it took.

With ``--endpoint`` the broker side runs already (docker compose's broker and services
containers): step 1 is skipped, the demo reads the CA certificate, the claim and service
identities (and, for the revocation, the CA key and registry) from that side's folder, and
with ``--agent-control`` it uses a fleet-agent that runs already, known by its control socket.
Steps 2-5 are the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import secrets
import signal
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from agent.session import tls_context
from broker import bootstrap
from broker.config import load_config
from broker.mosquitto import check_port_free, free_port
from broker.pki import PkiError, PkiPaths
from broker.stack import Stack
from simulator import demo_attacks
from simulator.demo_agent import AgentProcess, DemoAgent, RunningAgent
from simulator.demo_operator import Operator
from simulator.demo_report import Report, print_report
from simulator.metrics import Recorder
from simulator.virtual_device import SENT_AT_KEY, Counters, Target, VirtualDevice

__all__ = ["Report", "print_report", "run_demo", "run_demo_against"]

CONCURRENCY = 16  # onboardings in flight: a factory line, not a stampede
ATTEMPTS = 3  # per device, as the simulator's workers retry
UPDATES_PER_DEVICE = 2
AGENT_TIMEOUT = 30.0  # until the fleet-agent process has onboarded and reported
RUNNING_AGENT_TIMEOUT = 90.0  # one in another container may still be starting
DESIRED_TIMEOUT = 10.0
HOST = "127.0.0.1"  # in the broker certificate; the demo's broker listens only there

T = TypeVar("T")


def _timed(report: Report, label: str, action: Callable[[], T]) -> T:
    started = time.perf_counter()
    try:
        return action()
    finally:
        report.timings[label] = time.perf_counter() - started


def _raise_open_file_limit(devices: int) -> None:
    """Each virtual device holds a socket in this process: lift the soft limit if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = devices * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


@dataclass(frozen=True)
class BrokerSide:
    """Where the fleet connects and what the demo holds of the broker side."""

    host: str
    port: int
    # Its `fleet-broker --dir` folder: the CA certificate, the claim and service identities,
    # and for the revocation the CA key and the registry.
    pki: PkiPaths
    # SIGHUP to Mosquitto, so new handshakes see the CRL; None when the broker runs out of
    # reach (another container): the plugin's registry check at CONNECT refuses meanwhile.
    reload_crl: Callable[[], None] | None
    # Virtual devices' serial numbers start with it: an existing registry may hold the
    # things of an earlier run, and a live thing's name cannot be claimed again.
    serial_prefix: str = ""


def run_demo(devices: int, folder: Path | None, port: int | None, console: Console) -> Report:
    """Run the whole demo; BrokerError/ConfigError/PkiError/ConnectError if the broker side
    cannot be set up (the command line turns them into one line)."""
    workdir = folder or Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # the broker's user must reach the PKI folder when we are root
    report = Report(devices=devices, workdir=workdir)
    _raise_open_file_limit(devices)
    port = port or free_port()
    check_port_free(HOST, port)  # before the PKI: a busy port costs nothing
    pki = _timed(
        report,
        "PKI + registry (fleet-broker init)",
        lambda: bootstrap.initialize(workdir / "certs", force=True),
    )
    config = load_config(pki.root, port=port, bind_address=HOST)
    stack = Stack(config, with_services=True)
    report.endpoint = f"mqtts://{HOST}:{port}"
    # soft_wrap: a pipe's 80 columns must not break the URL in two
    console.print(
        f"[bold]mqtt-fleet demo[/] in {workdir}: broker side on {report.endpoint}", soft_wrap=True
    )
    agent = AgentProcess(workdir / "fleet-agent", pki, HOST, port, serial="0000", model="gateway")
    _timed(report, "broker + services up (fleet-broker up)", stack.start)  # stops itself on error
    side = BrokerSide(HOST, port, pki, stack.broker.reload)
    try:
        asyncio.run(_fleet(report, side, agent, devices, console))
    finally:
        with _interrupt_deferred():
            agent.stop()  # already stopped unless interrupted
            _timed(report, "stop everything", stack.stop)
    return report


# What the demo reads from a running broker side's folder, and why.
_NEEDED_FILES = {
    "ca_cert": "the CA certificate every connection verifies the broker with",
    "claim_cert": "the claim certificate the fleet onboards with",
    "claim_key": "the claim key",
    "service_cert": "the service identity the operator acts with",
    "service_key": "the service identity's key",
    "ca_key": "the CA key, to publish a CRL when the demo revokes a device",
    "registry": "the registry, where the demo revokes a device",
}


def run_demo_against(
    devices: int,
    endpoint: str,
    port: int,
    pki_root: Path,
    agent_socket: Path | None,
    folder: Path | None,
    console: Console,
) -> Report:
    """The demo against a broker side that runs already (docker compose's), as the operator
    on that side: ``pki_root`` is its `fleet-broker --dir` folder. With ``agent_socket`` the
    fleet-agent runs already too; without, the demo starts one here against the endpoint."""
    pki = PkiPaths(pki_root)
    for attribute, why in _NEEDED_FILES.items():
        path = getattr(pki, attribute)
        if not path.is_file():
            raise PkiError(
                f"{path} is missing ({why}): --pki must name the broker side's folder, "
                "as made by fleet-broker init"
            )
    report = Report(devices=devices, endpoint=f"mqtts://{endpoint}:{port}", external=True)
    _raise_open_file_limit(devices)
    agent: DemoAgent
    if agent_socket is not None:
        agent = RunningAgent(agent_socket)
    else:
        report.workdir = folder or Path(tempfile.mkdtemp(prefix="fleet-demo-"))
        report.workdir.mkdir(parents=True, exist_ok=True)
        agent = AgentProcess(
            report.workdir / "fleet-agent", pki, endpoint, port, serial="0000", model="gateway"
        )
    console.print(
        f"[bold]mqtt-fleet demo[/] against the broker side on {report.endpoint}", soft_wrap=True
    )
    side = BrokerSide(endpoint, port, pki, None, serial_prefix=f"{secrets.token_hex(3)}-")
    try:
        asyncio.run(_fleet(report, side, agent, devices, console))
    finally:
        with _interrupt_deferred():
            agent.stop()  # already stopped unless interrupted, or not ours
    return report


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done, then raise it.

    Stopping takes well under a second; a Ctrl-C in the middle of it would leave Mosquitto or
    the services running (they run in sessions of their own, out of the terminal's reach).
    A SIGTERM is held too: fleet-sim makes it do what Ctrl-C does (broker/children.py).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only: nothing to defer here
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


async def _fleet(
    report: Report, side: BrokerSide, agent: DemoAgent, devices: int, console: Console
) -> None:
    recorder = Recorder(time.time())
    pki = side.pki
    target = Target(side.host, side.port, pki.ca_cert, timeout=10.0)
    claim_context = tls_context(pki.ca_cert, pki.claim_cert, pki.claim_key)
    operator = Operator(pki, side.host, side.port)
    await asyncio.to_thread(operator.start)
    counters = Counters()
    fleet = [
        VirtualDevice(
            f"{side.serial_prefix}{i:04d}",
            target,
            claim_context,
            recorder,
            counters,
            parameters={"DeviceModel": "sensor"},
        )
        for i in range(1, devices)
    ]
    online: list[VirtualDevice] = []
    try:
        started = time.perf_counter()
        console.print(
            f"onboarding {devices} devices by claim: 1 fleet-agent process, "
            f"{len(fleet)} virtual devices …"
        )
        online = await _onboard(report, recorder, agent, fleet, operator, started)
        report.timings["onboarding (Fleet Provisioning)"] = time.perf_counter() - started
        agent_thing = report.onboarding.get("agent_thing")

        started = time.perf_counter()
        console.print("shadow: device reports, operator desired changes …")
        await _shadow(report, recorder, operator, online, agent_thing)
        report.timings["shadow traffic"] = time.perf_counter() - started

        started = time.perf_counter()
        console.print("attacks and a revocation …")
        await _attacks(report, side, target, claim_context, online, agent, agent_thing, operator)
        report.timings["attacks + revocation"] = time.perf_counter() - started
    finally:
        started = time.perf_counter()
        await asyncio.gather(*(d.close() for d in fleet), return_exceptions=True)
        code = await asyncio.to_thread(agent.stop)
        operator.close()
        report.timings["fleet disconnect"] = time.perf_counter() - started
        summary = recorder.summary()
        report.steps = summary["steps"]
        report.errors = summary["errors"]
    if agent.owned and agent.process is not None:
        report.check(
            "the fleet-agent process stops cleanly on SIGTERM",
            code == 0,
            f"exit code {code}" if code is not None else "did not stop within 15 s (killed)",
        )


async def _all(coroutines: Iterable[Awaitable[T]]) -> list[T | BaseException]:
    """Run them all; return once every one has finished, also when cancelled (Ctrl-C).

    ``gather`` without ``return_exceptions`` returns at the first cancelled child while the
    others still run; a device finishing its onboarding after the demo closed the fleet would
    stay connected, and its shadow task would keep the event loop from closing.
    """
    return await asyncio.gather(*coroutines, return_exceptions=True)


# ------------------------------------------------------------------------------ onboarding


async def _onboard_one(device: VirtualDevice, limit: asyncio.Semaphore) -> bool:
    async with limit:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await device.onboard()
                return True
            except Exception:  # recorded by kind inside; a real device backs off and retries
                if attempt < ATTEMPTS:
                    await asyncio.sleep(0.2 * attempt)
    return False


async def _onboard(
    report: Report,
    recorder: Recorder,
    agent: DemoAgent,
    fleet: list[VirtualDevice],
    operator: Operator,
    started: float,
) -> list[VirtualDevice]:
    agent.start()
    # Watched alongside, so its times are its own and not the virtual fleet's.
    agent_online = asyncio.create_task(_agent_online(report, agent, operator, started))
    limit = asyncio.Semaphore(CONCURRENCY)
    try:
        outcomes = await _all(_onboard_one(d, limit) for d in fleet)
    except BaseException:
        agent_online.cancel()
        raise
    virtual_seconds = time.perf_counter() - started
    online = [d for d, ok in zip(fleet, outcomes, strict=True) if ok is True]
    agent_thing, agent_problem = await agent_online
    onboarded = len(online) + (agent_thing is not None)
    report.onboarding.update(
        onboarded=onboarded,
        virtual=len(fleet),
        virtual_onboarded=len(online),
        virtual_seconds=virtual_seconds,
        rate_per_s=len(online) / virtual_seconds if virtual_seconds > 0 else 0.0,
        concurrency=CONCURRENCY,
    )
    retries = recorder.summary()["errors_total"]
    report.check(
        "every device onboards through Fleet Provisioning",
        onboarded == report.devices,
        f"{onboarded}/{report.devices} with the shared claim certificate, each with its own "
        f"key and CSR (the key never left the device)"
        + (f"; fleet-agent: {agent_problem}" if agent_problem else "")
        + (f"; {retries} failed attempt(s) retried" if retries else ""),
    )
    return online


async def _agent_online(
    report: Report, agent: DemoAgent, operator: Operator, started: float
) -> tuple[str | None, str | None]:
    """Until the agent has its thing and its first report reached the shadow."""
    timeout = AGENT_TIMEOUT if agent.owned else RUNNING_AGENT_TIMEOUT
    deadline = started + timeout
    thing = None
    while thing is None:
        thing = await asyncio.to_thread(agent.thing)
        if thing is not None:
            break
        if agent.exit_code() is not None:
            return None, f"exited ({agent.exit_code()}): {agent.log_tail()}"
        if time.perf_counter() > deadline:
            return None, f"not provisioned within {timeout:.0f} s: {agent.log_tail()}"
        await asyncio.sleep(0.05 if agent.owned else 0.5)
    report.onboarding["agent_thing"] = thing
    report.onboarding["agent_owned"] = agent.owned
    report.onboarding["agent_provisioned_s"] = time.perf_counter() - started
    try:
        # Device facts are the agent's first report once it runs as its thing. One that ran
        # before the operator connected reported already: its shadow holds them.
        operator.fetch(thing)
        arrived = await operator.wait_reported(
            thing, lambda reported: "device" in reported, max(0.1, deadline - time.perf_counter())
        )
    except asyncio.TimeoutError:
        return thing, f"no shadow report within {timeout:.0f} s: {agent.log_tail()}"
    report.onboarding["agent_reported_s"] = arrived - started
    return thing, None


# ---------------------------------------------------------------------------------- shadow


async def _report_twice(device: VirtualDevice, limit: asyncio.Semaphore) -> None:
    async with limit:
        for _ in range(UPDATES_PER_DEVICE):
            await device.update(64)


async def _shadow(
    report: Report,
    recorder: Recorder,
    operator: Operator,
    online: list[VirtualDevice],
    agent_thing: str | None,
) -> None:
    limit = asyncio.Semaphore(4 * CONCURRENCY)
    await _all(_report_twice(d, limit) for d in online)
    updates = recorder.summary()["steps"].get("shadow_update", {}).get("count", 0)
    wanted = UPDATES_PER_DEVICE * len(online)
    report.check(
        "devices report their shadow state",
        updates == wanted and wanted > 0,
        f"{updates}/{wanted} updates accepted by the Device Shadow service",
    )

    # The agent and every fourth virtual device get a desired change from the operator.
    things = ([agent_thing] if agent_thing else []) + [
        d.thing for d in online[::4] if d.thing is not None
    ]
    sent = {thing: index for index, thing in enumerate(things, start=1)}
    publish_times: dict[str, float] = {}

    async def round_trip(thing: str) -> bool:
        change = sent[thing]
        waiting = asyncio.ensure_future(
            operator.wait_reported(
                thing, lambda reported: reported.get("demo_change") == change, DESIRED_TIMEOUT
            )
        )
        await asyncio.sleep(0)  # the waiter is registered before the change goes out
        publish_times[thing] = time.perf_counter()
        desired: dict[str, object] = {"mode": ("eco", "boost")[change % 2], "demo_change": change}
        desired[SENT_AT_KEY] = time.time()  # virtual devices time the delta's delivery by it
        operator.desire(thing, desired)
        try:
            arrived = await waiting
        except asyncio.TimeoutError:
            return False
        recorder.observe("desired_to_reported", max(0.0, arrived - publish_times[thing]))
        return True

    delivered = await _all(round_trip(t) for t in things)
    count = sum(outcome is True for outcome in delivered)
    summary = recorder.summary()["steps"].get("desired_to_reported")
    report.shadow.update(desired_sent=len(things), desired_reported=count)
    timing = f": p50 {summary['p50_ms']:.0f} ms, max {summary['max_ms']:.0f} ms" if summary else ""
    agent_part = "the fleet-agent and " if agent_thing else ""
    report.check(
        "desired state reaches the devices and comes back reported",
        count == len(things) and count > 0,
        f"{count}/{len(things)} changes ({agent_part}every fourth virtual device) "
        f"desired -> applied -> reported, seen by the operator{timing}",
    )


# --------------------------------------------------------------------------------- attacks


async def _attacks(
    report: Report,
    side: BrokerSide,
    target: Target,
    claim_context: ssl.SSLContext,
    online: list[VirtualDevice],
    agent: DemoAgent,
    agent_thing: str | None,
    operator: Operator,
) -> None:
    if not online or agent_thing is None:
        report.check(
            "attacks and revocation",
            False,
            "skipped: they need an onboarded virtual device and the fleet-agent online",
        )
        return
    attacker, victim = online[0], online[-1]
    await demo_attacks.impostor(report, target, attacker, agent, agent_thing)
    await demo_attacks.device_overreach(report, attacker, agent_thing)
    await demo_attacks.claim_overreach(report, target, claim_context, agent_thing)
    if attacker is not victim:  # the flood ends with the attacker disconnected
        await demo_attacks.flood(report, attacker, victim)
    await demo_attacks.revocation(report, target, victim, operator, side.pki.root, side.reload_crl)
    await demo_attacks.reregistration(report, target, claim_context, victim)
