"""Regressions for the fault review of 2026-12 (findings F1-F4), as the review reproduced them.

Pure: how the end of a connection counts for the reconnect backoff (F3). Against the real
stack, with real `fleet-agent run` processes: a handler cut off by a broker restart (F1), a
registry that goes back to a backup (F2), a broker restarted right after the agent reconnected
(F3, with the runtime in-process to catch the moment), and a state folder that refuses writes (F4).

Then the review's other scenarios, each ending with every device's reported state equal to its
last desired state, no report lost, nothing going backwards, and the time to converge recorded:
kill -9 of the services, of Mosquitto and of agents; a frozen broker; down/up twice in a row;
reports made while the broker is unreachable; a corrupt CRL. And F5: a report the running agent
cannot save says so, naming the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent import control, reconnect, wire
from agent.handlers import HandlerSet
from agent.keystore import Keystore
from agent.reconnect import Backoff, ReconnectPolicy
from agent.runtime import DeviceRuntime, RuntimeSettings
from agent.shadow_sync import MemoryQueueStore, QueueNotSaved, ShadowSync
from broker.stack import RunningState, pid_alive
from tests.fleet import (
    AGENT_ENV,
    REPO,
    Client,
    Credentials,
    Fleet,
    agent_config,
    fleet_broker,
    make_workdir,
    running_fleet,
    start_agent_daemon,
)
from tests.test_agent_run import (
    desire,
    reported,
    runtime_state,
    shadow_cmd,
    stop_daemon,
    thing_of,
    wait_until,
)

pytestmark = pytest.mark.commands

# ------------------------------------------------------------------ F3, pure logic


def no_jitter(low: float, high: float) -> float:
    return high


@pytest.mark.unit
@pytest.mark.parametrize(
    ("closed_by_us", "code", "how"),
    [
        (False, None, "lost"),
        (False, 0x80, "lost"),  # also what paho reports for a socket closed without DISCONNECT
        (False, 0x8B, "lost"),  # server shutting down
        (False, 0x8D, "lost"),  # keepalive timeout
        (False, 0x98, "lost"),  # administrative action: the next handshake tells
        (False, 0x87, "refused"),
        (False, 0x8A, "refused"),
        (False, 0x9C, "refused"),
        (True, None, "ours"),
        (True, 0x87, "ours"),
    ],
)
def test_how_a_connection_ended(closed_by_us: bool, code: int | None, how: str) -> None:
    assert reconnect.ending(closed_by_us, code) == how


@pytest.mark.unit
def test_a_connection_lost_right_after_connack_is_transient() -> None:
    """F3: a broker restarted twice in a row ends the connection 0.1 s after CONNACK; that is
    no refusal of the certificate. The ordinary backoff still escalates while it repeats."""
    backoff = Backoff(ReconnectPolicy(), uniform=no_jitter)
    assert backoff.connection_ended(0.1, "lost") == "transient"
    assert backoff.failed("transient") == 1.0
    assert backoff.connection_ended(0.1, "lost") == "transient"
    assert backoff.failed("transient") == 2.0


@pytest.mark.unit
def test_our_own_close_never_counts_against_the_broker() -> None:
    backoff = Backoff(ReconnectPolicy(), uniform=no_jitter)
    assert backoff.connection_ended(0.0, "ours") == "transient"
    assert backoff.failed("transient") == 1.0


@pytest.mark.unit
def test_only_a_refusal_gets_the_identity_wait() -> None:
    policy = ReconnectPolicy(identity_min_delay=60.0)
    backoff = Backoff(policy, uniform=no_jitter)
    assert backoff.connection_ended(0.1, "refused") == "identity"
    assert backoff.failed("identity") == 60.0
    assert backoff.connection_ended(3600.0, "refused") == "identity"  # whenever it comes
    assert backoff.failures == 0  # but a stable connection still resets the count


@pytest.mark.unit
def test_a_stable_connection_resets_the_count() -> None:
    backoff = Backoff(ReconnectPolicy(stable_after=60.0), uniform=no_jitter)
    for _ in range(3):
        backoff.failed("transient")
    assert backoff.connection_ended(61.0, "lost") is None
    assert backoff.failures == 0
    assert backoff.connection_ended(10.0, "lost") == "transient"


# ------------------------------------------------------------------ real stack

HOOK = """#!{python}
import json, sys, time
request = json.load(sys.stdin)
with open({log!r}, "a") as log:
    log.write(json.dumps(request["delta"]) + "\\n")
time.sleep({seconds})
print(json.dumps(request["delta"]))
"""


def write_hook(folder: Path, seconds: float) -> tuple[Path, Path]:
    """A command handler that logs each delta it starts on, sleeps, and echoes it."""
    log, hook = folder / "hook.log", folder / "apply-desired"
    hook.write_text(HOOK.format(python=sys.executable, log=str(log), seconds=seconds))
    hook.chmod(0o755)
    return hook, log


def started(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def restart_broker(fleet: Fleet) -> None:
    """Only Mosquitto: the services reconnect by themselves."""
    fleet.stack.broker.stop()
    fleet.stack.broker.start()
    fleet.stack.broker.wait_listening()


def test_a_handler_cut_off_by_a_broker_restart_runs_again_and_is_reported() -> None:
    """F1: the broker restarts while the `[shadow] command` handler runs. The agent kills it;
    after the reconnect it hands the delta over again, and the result is reported."""
    with running_fleet(services=True) as fleet:
        hook, log = write_hook(make_workdir(), seconds=3)
        config = agent_config(fleet, "SN-F1", shadow=f'command = "{hook}"\ncommand_timeout = 20\n')
        daemon = start_agent_daemon(config)
        try:
            thing = thing_of(config)
            wait_until(lambda: runtime_state(config) == "connected", what="connected")
            desire(fleet.client(fleet.service, "operator-f1"), thing, {"seq": 1})
            wait_until(lambda: started(log), what="the handler started")
            restart_broker(fleet)
            wait_until(
                lambda: reported(fleet, thing).get("seq") == 1,
                timeout=30,
                what="the interrupted change reported",
            )
            assert started(log) == [{"seq": 1}, {"seq": 1}]
        finally:
            code, _ = stop_daemon(daemon)
        assert code == 0


def test_a_get_the_services_were_not_up_for_is_asked_again_on_the_same_connection() -> None:
    """Mosquitto back before the services, and no session of theirs kept (a crash of the
    host): the agent's get after the reconnect reaches nobody. It is sent again within the
    connection, so the agent follows once the services are up, without waiting out the get's
    timeout and reconnecting."""
    with running_fleet(services=True) as fleet, devices_running(fleet, ["SN-EARLY"]) as devices:
        (device,) = devices
        operator = fleet.client(fleet.service, "operator-early")
        desire(operator, device.thing, {"seq": 1})
        wait_until(lambda: in_sync(shadow_state(fleet, device.thing)), what="seq 1")
        fleet.close_clients()
        # The host lost power, say: Mosquitto never saved the services' persistent session,
        # so nothing queues the requests for them once it is back.
        services, broker = fleet.stack.services, fleet.stack.broker.process
        assert services is not None and broker is not None
        for process in (services, broker):
            process.kill()
            process.wait(10)
        fleet.stack.broker.start()
        fleet.stack.broker.wait_listening()
        wait_until(lambda: device.connections() == 2, what="the agent reconnected")
        time.sleep(2)  # its get after CONNACK is lost, and one sent again after a second
        fleet.stack._start_services()
        operator = fleet.client(fleet.service, "operator-early-2")
        desire(operator, device.thing, {"seq": 2})
        wait_until(lambda: in_sync(shadow_state(fleet, device.thing)), what="seq 2")
        assert device.connections() == 2, device.err()
        assert "connection gone" not in device.err(), device.err()


def test_after_the_registry_goes_back_to_a_backup_the_agent_follows() -> None:
    """F2: the shadow's version goes back (registry restored). The get on reconnect is taken
    although its version is lower; new desired state is applied; a report is accepted."""
    with running_fleet(services=True) as fleet:
        hook, log = write_hook(make_workdir(), seconds=0)
        config = agent_config(fleet, "SN-F2", shadow=f'command = "{hook}"\n')
        daemon = start_agent_daemon(config)
        try:
            thing = thing_of(config)
            operator = fleet.client(fleet.service, "operator-f2")
            desire(operator, thing, {"seq": 1})
            wait_until(lambda: reported(fleet, thing).get("seq") == 1, what="seq 1")
            with fleet.registry() as registry:
                backup = registry.load_shadow(thing, "")
            assert backup is not None and backup.document is not None
            for seq in (2, 3, 4):
                desire(operator, thing, {"seq": seq})
                wait_until(lambda s=seq: reported(fleet, thing).get("seq") == s, what=f"seq {seq}")

            fleet.close_clients()
            fleet.stack.stop()
            with fleet.registry() as registry:
                registry.save_shadow(thing, "", backup.document, backup.version)
            fleet.stack.start()

            desire(fleet.client(fleet.service, "operator-f2-back"), thing, {"seq": 5})
            wait_until(lambda: reported(fleet, thing).get("seq") == 5, timeout=40, what="seq 5")
            assert started(log)[-1] == {"seq": 5}
            proc = shadow_cmd(config, "report", "probe=1", "--wait", "10")
            assert proc.returncode == 0, proc.stderr
            assert reported(fleet, thing)["probe"] == 1
        finally:
            code, err = stop_daemon(daemon)
        assert code == 0
        assert err.count("version conflict") < 10, err


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached in time"
        await asyncio.sleep(0.02)


def test_a_broker_restarted_right_after_the_agent_connected_is_no_refusal() -> None:
    """F3: the broker goes down again just after the agent reconnected (a crash loop, an
    operator restarting twice). The agent comes back with the ordinary backoff, not after
    the minute-long wait for a refused certificate."""
    with running_fleet(services=True) as fleet:
        thing = "fault-f3"
        creds = fleet.device(thing)
        settings = RuntimeSettings(
            endpoint=fleet.config.connect_host,
            port=fleet.config.port,
            ca_file=fleet.pki.ca_cert,
            thing=thing,
            cert_file=creds.cert,
            key_file=creds.key,
            timeout=5,
            reconnect=ReconnectPolicy(identity_min_delay=60.0),
        )

        async def main() -> None:
            sync = ShadowSync(thing, None, HandlerSet(), MemoryQueueStore(), timeout=5)
            runtime = DeviceRuntime(settings, [sync])
            stop = asyncio.Event()
            running = asyncio.create_task(runtime.run(stop))
            try:
                await until(lambda: runtime.state == "connected", 10, "connected")
                await asyncio.to_thread(restart_broker, fleet)  # well within 2 s of CONNACK
                await until(
                    lambda: runtime.connections == 2 and runtime.state == "connected",
                    20,
                    "connected again",
                )
            finally:
                stop.set()
                await running

        asyncio.run(main())


def test_a_state_folder_that_refuses_writes_does_not_stop_the_agent() -> None:
    """F4: the queue's folder refuses writes for a while (here a file in its place, which
    refuses root too). The agent logs it, device facts keep coming once it can write again
    (before, the reporter had stopped for good), and SIGTERM still exits 0 (was 70)."""
    with running_fleet(services=True) as fleet:
        config = agent_config(fleet, "SN-F4", shadow="report_interval = 5\n")
        daemon = start_agent_daemon(config)
        shadows = config.parent / "state" / "shadows"
        aside = shadows.with_name("shadows.aside")
        try:
            thing = thing_of(config)

            def uptime() -> int:
                return reported(fleet, thing).get("device", {}).get("agent_uptime_s", -1)

            wait_until(lambda: uptime() >= 0 and shadows.is_dir(), what="device facts")
            shadows.rename(aside)
            shadows.write_text("")
            frozen = uptime()
            time.sleep(6)  # at least one report tick meets the broken folder
            shadows.unlink()
            aside.rename(shadows)
            wait_until(lambda: uptime() >= frozen + 10, timeout=30, what="facts moving again")
        finally:
            code, err = stop_daemon(daemon)
        assert code == 0, err
        assert f"cannot write the report queue {shadows / 'classic.pending.json'}" in err


# ------------------------------------------------------------------ the review's other scenarios
#
# Each against the real stack with two or three real `fleet-agent run` devices whose
# `[shadow] command` handler logs what it applies and echoes the delta. Each ends with every
# device's reported state equal to its last desired state (the last change the shadow service
# accepted), no report lost, no reported value seen going backwards, and the time to converge
# recorded (printed and attached with record_property; never asserted).

FAULT_HOOK = """#!{python}
import json, sys, time
request = json.load(sys.stdin)
def note(event):
    with open({log!r}, "a") as log:
        log.write(json.dumps({{"event": event, "delta": request["delta"]}}) + "\\n")
note("start")
time.sleep({seconds})
note("done")
print(json.dumps(request["delta"]))
"""


class Device:
    """A real `fleet-agent run` whose handler logs each delta it starts and finishes on. Its
    log goes to a file (read while it runs, and kept across restarts)."""

    def __init__(self, fleet: Fleet, serial: str, *, handler_seconds: float = 0.2) -> None:
        folder = make_workdir()
        self.hook_log, hook = folder / "hook.log", folder / "apply-desired"
        hook.write_text(
            FAULT_HOOK.format(
                python=sys.executable, log=str(self.hook_log), seconds=handler_seconds
            )
        )
        hook.chmod(0o755)
        self.config = agent_config(
            fleet, serial, shadow=f'command = "{hook}"\ncommand_timeout = 20\n'
        )
        self.state = self.config.parent / "state"
        self.log = self.config.parent / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.thing = ""

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                cwd=REPO,
                env=AGENT_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(20)

    def stop(self) -> int | None:
        """SIGTERM; the exit status (None if it had ended already)."""
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def err(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def connections(self) -> int:
        return self.err().count("fleet.agent.runtime: connected to ")

    def record(self) -> tuple[str, str]:
        record = Keystore(self.state).load_record()
        assert record is not None
        return record.thing_name, record.certificate_id

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.hook_log.exists():
            return []
        lines = [json.loads(line) for line in self.hook_log.read_text().splitlines()]
        return [(line["event"], line["delta"]) for line in lines]

    def applied(self, event: str = "done") -> list[Any]:
        return [delta.get("seq") for what, delta in self.events() if what == event]


def shadow_state(fleet: Fleet, thing: str) -> dict[str, Any]:
    with fleet.registry() as registry:
        row = registry.load_shadow(thing, "")
    if row is None or row.document is None:
        return {}
    return json.loads(row.document).get("state", {})


def in_sync(state: dict[str, Any]) -> bool:
    desired, got = state.get("desired") or {}, state.get("reported") or {}
    return bool(desired) and all(got.get(key) == value for key, value in desired.items())


class Watch:
    """Polls the registry every 50 ms: each thing's distinct reported values of ``keys``, in
    the order seen."""

    def __init__(self, fleet: Fleet, things: list[str], keys: tuple[str, ...] = ("seq", "probe")):
        self.fleet, self.things, self.keys = fleet, things, keys
        self.seen: dict[str, dict[str, list[Any]]] = {t: {k: [] for k in keys} for t in things}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(sqlite3.OperationalError):  # busy: the next poll tells
                self.poll()

    def poll(self) -> None:
        for thing in self.things:
            got = shadow_state(self.fleet, thing).get("reported") or {}
            for key in self.keys:
                values = self.seen[thing][key]
                if key in got and (not values or values[-1] != got[key]):
                    values.append(got[key])

    def assert_never_backwards(self) -> None:
        self.poll()
        for thing, keys in self.seen.items():
            for key, values in keys.items():
                assert values == sorted(values), f"{thing}: reported.{key} went back: {values}"


class Traffic:
    """The operator changing every device's desired.seq, round after round, with the
    service identity, whatever the broker goes through: a change counts as made (``acked``)
    once the shadow service accepted it. A client that lost its connection is replaced (and
    stopped: it never resends an older change later)."""

    def __init__(self, fleet: Fleet, things: list[str], *, pause: float = 0.3) -> None:
        self.fleet, self.things, self.pause = fleet, things, pause
        self.sent = dict.fromkeys(things, 0)
        self.acked = dict.fromkeys(things, 0)
        self.full_rounds: list[float] = []  # when each round with every change accepted ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._client: Client | None = None
        self._clients = 0

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    def full_round_after(self, moment: float, timeout: float = 30) -> None:
        wait_until(
            lambda: any(t > moment for t in self.full_rounds),
            timeout=timeout,
            what="a round of desired changes all accepted",
        )

    def _operator(self) -> Client:
        client = self._client
        if client is not None and client.accepted and not client.disconnected.is_set():
            return client
        if client is not None:
            client.stop()
        self._client = None
        self._clients += 1
        client = Client(self.fleet, self.fleet.service, f"operator-traffic-{self._clients}")
        try:
            client.start(timeout=3)
            assert client.accepted, "operator not connected"
            for thing in self.things:
                client.subscribe(wire.shadow_reply(thing, "update", "accepted"), timeout=3)
        except BaseException:
            client.stop()
            raise
        self._client = client
        return client

    def _desire(self, thing: str, seq: int) -> None:
        client = self._operator()
        token = f"traffic-{thing}-{seq}"
        self.sent[thing] = seq
        client.paho.publish(
            wire.shadow_topic(thing, "update"),
            json.dumps({"state": {"desired": {"seq": seq}}, "clientToken": token}),
            qos=1,
        )
        accepted = wire.shadow_reply(thing, "update", "accepted")
        reply = client.received.wait_for(
            lambda m: m.topic == accepted and json.loads(m.payload).get("clientToken") == token,
            timeout=3,
        )
        assert reply is not None, f"seq {seq} for {thing} not accepted"
        self.acked[thing] = seq

    def _run(self) -> None:
        seq = 0
        try:
            while not self._stop.is_set():
                seq += 1
                complete = True
                for thing in self.things:
                    try:
                        self._desire(thing, seq)
                    except Exception:  # the broker is down, frozen, restarting
                        complete = False
                        if self._client is not None:
                            self._client.stop()
                            self._client = None
                        time.sleep(0.2)
                if complete:
                    self.full_rounds.append(time.monotonic())
                self._stop.wait(self.pause)
        finally:
            if self._client is not None:
                self._client.stop()


def assert_converged(
    fleet: Fleet,
    devices: list[Device],
    since: float,
    record_property: Callable[[str, object], None],
    *,
    last: dict[str, int] | None = None,
    timeout: float = 45,
) -> float:
    """Every device's reported state equals its last desired state, and desired.seq is the
    last change accepted (``last``: no accepted change lost, nothing newer slipped in); the
    handler's last finished run was that value. Records and returns the seconds since
    ``since``."""
    things = [d.thing for d in devices]
    try:
        wait_until(
            lambda: all(in_sync(shadow_state(fleet, t)) for t in things),
            timeout=timeout,
            what="every device reporting its desired state",
        )
    except AssertionError:
        behind = [d for d in devices if not in_sync(shadow_state(fleet, d.thing))]
        for device in behind:
            print(f"--- {device.thing}: {shadow_state(fleet, device.thing)}")
            print(f"events: {device.events()[-6:]}")
            print(device.err()[-6000:])
        raise
    took = time.monotonic() - since
    for device in devices:
        state = shadow_state(fleet, device.thing)
        assert in_sync(state), (device.thing, state)
        seq = state["desired"]["seq"]
        if last is not None:
            assert seq == last[device.thing], (device.thing, state, last)
        assert device.applied()[-1] == seq, (device.thing, device.events())
        started_values = device.applied("start")
        assert started_values == sorted(started_values), (device.thing, device.events())
        assert "Traceback" not in device.err(), device.err()
    record_property("converge_s", round(took, 2))
    print(f"converged {took:.1f} s after the fault ended")
    return took


@contextlib.contextmanager
def devices_running(fleet: Fleet, serials: list[str], **kwargs: Any) -> Iterator[list[Device]]:
    devices = [Device(fleet, serial, **kwargs) for serial in serials]
    try:
        for device in devices:
            device.start()
        for device in devices:
            device.thing = thing_of(device.config)
            wait_until(device.connections, what=f"{device.thing} connected")
        yield devices
    finally:
        codes = {d.thing: d.stop() for d in devices}
        for device in devices:
            assert "Traceback" not in device.err(), device.err()
    assert all(code in (0, None) for code in codes.values()), codes


class Up:
    """`fleet-broker up` as a real process for ``fleet`` (its stack object stays unused):
    the supervisor that restarts crashed services, and what `down` stops."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.log = fleet.workdir / "up.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it and wait until it is up; when it was."""
        port, host = str(self.fleet.config.port), self.fleet.config.bind_address
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "broker.cli", "--dir", str(self.fleet.pki.root)),
                    *("up", "--port", port, "--bind", host, "--log-level", "info"),
                ],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        process = self.process

        def ready() -> bool:
            assert process.poll() is None, self.log.read_text()
            state = self.state()
            return state is not None and state.supervisor_pid == process.pid

        wait_until(ready, timeout=30, what="fleet-broker up")
        return time.monotonic()

    def state(self) -> RunningState | None:
        return RunningState.read(self.fleet.stack.files)

    def down(self) -> None:
        result = fleet_broker(self.fleet, "down")
        assert result.returncode == 0, result.stderr
        assert self.process is not None
        assert self.process.wait(20) == 0, self.log.read_text()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.down()


@contextlib.contextmanager
def fleet_under_up() -> Iterator[tuple[Fleet, Up]]:
    fleet = Fleet(make_workdir(), services=True)
    up = Up(fleet)
    up.start()
    try:
        yield fleet, up
    finally:
        fleet.close_clients()
        up.close()


def test_services_killed_by_sigkill_are_restarted_by_up_and_the_fleet_converges(
    record_property: Callable[[str, object], None],
) -> None:
    """`kill -9` of the services under `fleet-broker up`, with desired changes going on: `up`
    restarts them (and its run state names the new pid, F6), the fleet catches up."""
    with (
        fleet_under_up() as (fleet, up),
        devices_running(fleet, ["SN-SVC-1", "SN-SVC-2"]) as devices,
    ):
        things = [d.thing for d in devices]
        with Watch(fleet, things) as watch, Traffic(fleet, things) as traffic:
            traffic.full_round_after(time.monotonic())
            before = up.state()
            assert before is not None
            killed = time.monotonic()
            os.kill(before.services_pid, signal.SIGKILL)

            def restarted() -> RunningState | None:
                state = up.state()
                return state if state and state.services_pid != before.services_pid else None

            after = wait_until(restarted, timeout=30, what="services restarted")
            back = time.monotonic()
            assert after.services_restarts == 1 and pid_alive(after.services_pid)
            assert "the fleet services exited; restarting them" in up.log.read_text()
            traffic.full_round_after(back)
            traffic.stop()
            record_property("services_restart_s", round(back - killed, 2))
            print(f"services restarted {back - killed:.1f} s after the kill")
            assert_converged(fleet, devices, killed, record_property, last=traffic.acked)
            watch.assert_never_backwards()


def test_mosquitto_killed_by_sigkill_then_up_again_the_fleet_converges(
    record_property: Callable[[str, object], None],
) -> None:
    """`kill -9` of Mosquitto under traffic: `up` ends (exit 1, by design), services stopped;
    `up` again, and every device catches up by itself."""
    with fleet_under_up() as (fleet, up), devices_running(fleet, ["SN-MQ-1", "SN-MQ-2"]) as devices:
        things = [d.thing for d in devices]
        with Watch(fleet, things) as watch, Traffic(fleet, things) as traffic:
            traffic.full_round_after(time.monotonic())
            state = up.state()
            assert state is not None and up.process is not None
            os.kill(state.mosquitto_pid, signal.SIGKILL)
            assert up.process.wait(20) == 1
            assert "Mosquitto exited unexpectedly" in up.log.read_text()
            assert not pid_alive(state.services_pid)
            back = up.start()
            traffic.full_round_after(back)
            traffic.stop()
            assert_converged(fleet, devices, back, record_property, last=traffic.acked)
            watch.assert_never_backwards()


def test_agents_killed_by_sigkill_lose_nothing(
    record_property: Callable[[str, object], None],
) -> None:
    """`kill -9` of an agent during a handler, right after one, and with a report queued on
    disk (the broker frozen meanwhile); and desired changes made while an agent is dead.
    After a restart: the same thing and certificate, the interrupted change applied and
    reported, the queued report delivered."""
    with running_fleet(services=True) as fleet:
        during = Device(fleet, "SN-KILL-DURING", handler_seconds=2)
        after = Device(fleet, "SN-KILL-AFTER", handler_seconds=0)
        queued = Device(fleet, "SN-KILL-QUEUED", handler_seconds=0)
        devices = [during, after, queued]
        try:
            for device in devices:
                device.start()
            for device in devices:
                device.thing = thing_of(device.config)
                wait_until(device.connections, what=f"{device.thing} connected")
            identities = {d.thing: d.record() for d in devices}
            operator = fleet.client(fleet.service, "operator-kill")
            last = dict.fromkeys(identities, 1)
            with Watch(fleet, list(identities)) as watch:
                for device in devices:
                    desire(operator, device.thing, {"seq": 1})
                wait_until(lambda: all(d.applied() == [1] for d in devices), what="seq 1")
                wait_until(
                    lambda: all(in_sync(shadow_state(fleet, d.thing)) for d in devices),
                    what="seq 1 reported",
                )

                desire(operator, during.thing, {"seq": 2})
                wait_until(lambda: during.applied("start") == [1, 2], what="handler running")
                during.kill()
                desire(operator, during.thing, {"seq": 3})  # while it is dead
                last[during.thing] = 3

                desire(operator, after.thing, {"seq": 2})
                wait_until(lambda: after.applied() == [1, 2], timeout=10, what="handler done")
                after.kill()
                last[after.thing] = 2

                broker = fleet.stack.broker.pid
                os.kill(broker, signal.SIGSTOP)
                try:
                    proc = shadow_cmd(queued.config, "report", "probe=1", "--wait", "1")
                    assert proc.returncode == 3, proc.stderr
                    assert "saved in the report queue" in proc.stderr
                    pending = queued.state / "shadows" / "classic.pending.json"
                    assert json.loads(pending.read_text())["patches"] == [{"probe": 1}]
                    queued.kill()
                finally:
                    os.kill(broker, signal.SIGCONT)

                restarted = time.monotonic()
                for device in devices:
                    device.start()
                assert_converged(fleet, devices, restarted, record_property, last=last)
                wait_until(
                    lambda: shadow_state(fleet, queued.thing)["reported"].get("probe") == 1,
                    what="the queued report delivered",
                )
                wait_until(lambda: not pending.exists(), what="queue emptied")
                watch.assert_never_backwards()
            assert {d.thing: d.record() for d in devices} == identities
            assert during.applied("start")[:2] == [1, 2] and during.applied()[-1] == 3
        finally:
            codes = [d.stop() for d in devices]
        assert codes == [0, 0, 0], [d.err() for d in devices]


def test_a_frozen_broker_under_traffic_the_fleet_converges(
    record_property: Callable[[str, object], None],
) -> None:
    """Mosquitto frozen (SIGSTOP) for 4 s while desired state keeps changing, then resumed."""
    with (
        running_fleet(services=True) as fleet,
        devices_running(fleet, ["SN-FROZEN-1", "SN-FROZEN-2", "SN-FROZEN-3"]) as devices,
    ):
        things = [d.thing for d in devices]
        with Watch(fleet, things) as watch, Traffic(fleet, things) as traffic:
            traffic.full_round_after(time.monotonic())
            broker = fleet.stack.broker.pid
            os.kill(broker, signal.SIGSTOP)
            try:
                time.sleep(4)
            finally:
                os.kill(broker, signal.SIGCONT)
            resumed = time.monotonic()
            traffic.full_round_after(resumed)
            traffic.stop()
            assert fleet.stack.broker.alive()
            assert_converged(fleet, devices, resumed, record_property, last=traffic.acked)
            watch.assert_never_backwards()


def test_down_and_up_twice_in_a_row_under_traffic_the_fleet_converges(
    record_property: Callable[[str, object], None],
) -> None:
    """`fleet-broker down` / `up`, and again as soon as a device is back: no accepted desired
    change lost, and the agents come back by themselves with the ordinary backoff (F3)."""
    with (
        fleet_under_up() as (fleet, up),
        devices_running(fleet, ["SN-TWICE-1", "SN-TWICE-2", "SN-TWICE-3"]) as devices,
    ):
        things = [d.thing for d in devices]
        with Watch(fleet, things) as watch, Traffic(fleet, things) as traffic:
            traffic.full_round_after(time.monotonic())
            connections = sum(d.connections() for d in devices)
            up.down()
            up.start()
            wait_until(
                lambda: sum(d.connections() for d in devices) > connections,
                what="a device back",
            )
            up.down()
            back = up.start()
            traffic.full_round_after(back)
            traffic.stop()
            assert_converged(fleet, devices, back, record_property, last=traffic.acked)
            watch.assert_never_backwards()
        for device in devices:
            assert "as a refusal of this certificate" not in device.err(), device.err()


def test_reports_made_while_the_broker_is_unreachable_are_delivered_after(
    record_property: Callable[[str, object], None],
) -> None:
    """The broker side down: `fleet-agent shadow report` through each running agent exits 3
    with the queue on disk; once it is up again every report arrives (the later value last)."""
    with (
        running_fleet(services=True) as fleet,
        devices_running(fleet, ["SN-AWAY-1", "SN-AWAY-2"]) as devices,
    ):
        things = [d.thing for d in devices]
        operator = fleet.client(fleet.service, "operator-away")
        for device in devices:
            desire(operator, device.thing, {"seq": 1})
        with Watch(fleet, things) as watch:
            wait_until(lambda: all(in_sync(shadow_state(fleet, t)) for t in things), what="seq 1")
            fleet.close_clients()
            fleet.stack.stop()
            for device in devices:
                for probe in (1, 2):
                    proc = shadow_cmd(device.config, "report", f"probe={probe}", "--wait", "1")
                    assert proc.returncode == 3, proc.stderr
                    assert "saved in the report queue" in proc.stderr, proc.stderr
                pending = device.state / "shadows" / "classic.pending.json"
                assert json.loads(pending.read_text())["patches"] == [{"probe": 2}]
            fleet.stack.start()
            back = time.monotonic()
            wait_until(
                lambda: all(shadow_state(fleet, t)["reported"].get("probe") == 2 for t in things),
                timeout=45,
                what="the offline reports delivered",
            )
            assert_converged(fleet, devices, back, record_property, last=dict.fromkeys(things, 1))
            for device in devices:
                wait_until(
                    lambda d=device: not (d.state / "shadows" / "classic.pending.json").exists(),
                    what="queue emptied",
                )
            watch.assert_never_backwards()


def refused(fleet: Fleet, creds: Credentials, client_id: str) -> str:
    """How a fresh connection with ``creds`` is refused (in the TLS handshake, or at
    CONNACK); "" if it is accepted. Waits for whichever comes: with TLS 1.3 the broker's
    alert about the client certificate arrives after the client's handshake is done."""
    client = Client(fleet, creds, client_id)
    try:
        client.paho.connect("127.0.0.1", fleet.config.port, 30)
    except (OSError, ssl.SSLError) as exc:
        return f"handshake: {exc}"
    client.paho.loop_start()
    try:
        wait_until(
            lambda: client.connected.is_set() or client.disconnected.is_set(),
            timeout=10,
            what="CONNACK or the end of the connection",
        )
    finally:
        client.stop()
    if client.accepted:
        return ""
    return f"CONNACK {client.connack}" if client.connack else f"closed {client.disconnect_reason}"


def test_a_corrupt_crl_never_fails_open(record_property: Callable[[str, object], None]) -> None:
    """A revoked device, then garbage in crl.pem and SIGHUP: the broker keeps running, the
    revoked device stays refused, the others keep converging. A start with the garbage CRL
    rebuilds it from the registry."""
    with (
        running_fleet(services=True) as fleet,
        devices_running(fleet, ["SN-CRL-1", "SN-CRL-2", "SN-CRL-REVOKED"]) as devices,
    ):
        *kept, gone = devices
        revoke = fleet_broker(fleet, "revoke", gone.thing)
        assert revoke.returncode == 0, revoke.stderr
        assert gone.process is not None
        process = gone.process
        # `revoke` has the CRL re-read before it kicks, so the reconnect meets the TLS refusal
        # and the agent exits 4 (revoked), instead of a CONNECT refusal and the identity wait.
        wait_until(lambda: process.poll() is not None, what="the revoked device ended")
        assert process.returncode == 4, gone.err()
        gone.stop()
        creds = Credentials(gone.state / "device.pem", gone.state / "device.key")
        assert refused(fleet, creds, gone.thing), "a revoked device was let in"

        fleet.pki.crl.write_text("-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
        fleet.stack.broker.reload()
        things = [d.thing for d in kept]
        with Watch(fleet, things) as watch, Traffic(fleet, things) as traffic:
            since = time.monotonic()
            traffic.full_round_after(since)
            time.sleep(1)
            assert fleet.stack.broker.alive(), fleet.stack.files.log.read_text()
            assert refused(fleet, creds, gone.thing), "a revoked device was let in"
            traffic.full_round_after(time.monotonic())
            traffic.stop()
            assert_converged(fleet, kept, since, record_property, last=traffic.acked)
            watch.assert_never_backwards()

        fleet.close_clients()
        fleet.stack.stop()
        fleet.pki.crl.write_text("garbage")
        fleet.stack.start()
        crl = x509.load_pem_x509_crl(fleet.pki.crl.read_bytes())
        serial = x509.load_pem_x509_certificate(creds.cert.read_bytes()).serial_number
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert refused(fleet, creds, gone.thing), "a revoked device was let in"


# ------------------------------------------------------------------ F5: the disk named


@pytest.mark.unit
def test_the_control_socket_passes_back_a_queue_that_was_not_saved() -> None:
    """F5, the socket alone: an operation that could not save the queue answers with the
    file and the cause (it used to close without an answer: "the running agent gave no
    answer")."""
    where = Path("/var/lib/fleet-agent/shadows/classic.pending.json")

    async def report(_: dict[str, Any]) -> dict[str, Any]:
        raise QueueNotSaved(where, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    async def main(path: Path) -> str:
        server = await control.serve(path, {"report": report})
        try:
            with pytest.raises(control.ControlError) as caught:
                await asyncio.to_thread(control.call, path, {"op": "report"}, 5.0)
        finally:
            server.close()
            await server.wait_closed()
        assert caught.value.permanent  # asking again cannot help: exit 1, not 3
        return str(caught.value)

    message = asyncio.run(main(make_workdir() / "agent.sock"))
    assert message == (
        f"cannot write the report queue {where}: No space left on device; the report is sent "
        "from memory but not saved (lost if the agent stops before it is sent)"
    )


def test_a_report_the_agent_cannot_save_names_the_file_and_is_sent_from_memory() -> None:
    """F5: `fleet-agent shadow report` through a running agent whose state folder refuses
    the write: one line naming the queue file and the cause, saying it was sent from memory
    but not saved; and it is reported all the same."""
    with running_fleet(services=True) as fleet:
        config = agent_config(fleet, "SN-F5")
        daemon = start_agent_daemon(config)
        shadows = config.parent / "state" / "shadows"
        aside = shadows.with_name("shadows.aside")
        try:
            thing = thing_of(config)
            wait_until(lambda: reported(fleet, thing).get("device") and shadows.is_dir())
            shadows.rename(aside)
            shadows.write_text("")  # refuses root too
            try:
                proc = shadow_cmd(config, "report", "probe=1", "--wait", "3")
                wait_until(lambda: reported(fleet, thing).get("probe") == 1, what="sent")
            finally:
                shadows.unlink()
                aside.rename(shadows)
            assert proc.returncode == 1, proc.stderr  # permanent until the folder is fixed
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1, proc.stderr
            assert f"cannot write the report queue {shadows / 'classic.pending.json'}" in lines[0]
            assert "sent from memory but not saved" in lines[0]
            proc = shadow_cmd(config, "report", "probe=2", "--wait", "5")
            assert proc.returncode == 0, proc.stderr
        finally:
            code, err = stop_daemon(daemon)
        assert code == 0, err
        assert "control request failed" not in err  # no traceback in the agent's log either


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` remounted read-only in place (a bind mount), as after a disk error."""
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_state_folder_is_named_in_one_line_by_every_command() -> None:
    """F5: the state folder remounted read-only. Commands that need it say so in one line,
    with the folder, the cause and the fix, and a permanent exit code (it used to be
    "internal error (OSError)", exit 70); `status` still reads it."""
    with running_fleet(services=True) as fleet:
        config = agent_config(fleet, "SN-RO")
        daemon = start_agent_daemon(config)
        try:
            thing_of(config)
            wait_until(lambda: runtime_state(config) == "connected", what="connected")
        finally:
            stop_daemon(daemon)
        state = config.parent / "state"
        with read_only(state):
            for command in (["run"], ["shadow", "report", "probe=1"], ["connect"]):
                proc = subprocess.run(
                    [sys.executable, "-m", "agent.cli", *command, "--config", str(config)],
                    cwd=REPO,
                    env=AGENT_ENV,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert proc.returncode == 2, (command, proc.stderr)
                assert proc.stderr.strip().splitlines() == [
                    f"fleet-agent: the state folder {state} refuses writes (Read-only file "
                    "system); the agent keeps its report queue, lock and renewed certificates "
                    "there: make it writable (read-write mount, free space, owner) and start "
                    "again"
                ], (command, proc.stderr)
            status = subprocess.run(
                [sys.executable, "-m", "agent.cli", "status", "--config", str(config)],
                cwd=REPO,
                env=AGENT_ENV,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert status.returncode == 0 and "not running" in status.stdout, status
