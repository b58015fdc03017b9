"""Regressions for the fault review of 2026-12 (findings F1-F4), as the review reproduced them.

Pure: how the end of a connection counts for the reconnect backoff (F3). Against the real
stack, with real `fleet-agent run` processes: a handler cut off by a broker restart (F1), a
registry that goes back to a backup (F2), a broker restarted right after the agent reconnected
(F3, with the runtime in-process to catch the moment), and a state folder that refuses writes (F4).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import reconnect
from agent.handlers import HandlerSet
from agent.reconnect import Backoff, ReconnectPolicy
from agent.runtime import DeviceRuntime, RuntimeSettings
from agent.shadow_sync import MemoryQueueStore, ShadowSync
from tests.fleet import Fleet, agent_config, make_workdir, running_fleet, start_agent_daemon
from tests.test_agent_run import (
    desire,
    reported,
    runtime_state,
    shadow_cmd,
    stop_daemon,
    thing_of,
    wait_until,
)

# ------------------------------------------------------------------ F3, pure logic


def no_jitter(low: float, high: float) -> float:
    return high


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


def test_a_connection_lost_right_after_connack_is_transient() -> None:
    """F3: a broker restarted twice in a row ends the connection 0.1 s after CONNACK; that is
    no refusal of the certificate. The ordinary backoff still escalates while it repeats."""
    backoff = Backoff(ReconnectPolicy(), uniform=no_jitter)
    assert backoff.connection_ended(0.1, "lost") == "transient"
    assert backoff.failed("transient") == 1.0
    assert backoff.connection_ended(0.1, "lost") == "transient"
    assert backoff.failed("transient") == 2.0


def test_our_own_close_never_counts_against_the_broker() -> None:
    backoff = Backoff(ReconnectPolicy(), uniform=no_jitter)
    assert backoff.connection_ended(0.0, "ours") == "transient"
    assert backoff.failed("transient") == 1.0


def test_only_a_refusal_gets_the_identity_wait() -> None:
    policy = ReconnectPolicy(identity_min_delay=60.0)
    backoff = Backoff(policy, uniform=no_jitter)
    assert backoff.connection_ended(0.1, "refused") == "identity"
    assert backoff.failed("identity") == 60.0
    assert backoff.connection_ended(3600.0, "refused") == "identity"  # whenever it comes
    assert backoff.failures == 0  # but a stable connection still resets the count


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
