"""`fleet-agent run` and `fleet-agent shadow` as real processes against the real stack.

The device's life: first start provisions and syncs; desired state reaches the command hook
and what it reached is reported; a person at the device reads and reports through the running
agent; the broker restarts and the agent catches up; reports made offline arrive merged; a
revoked certificate ends the agent with its own exit code instead of a retry loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import wire
from agent.keystore import Keystore
from tests.fleet import (
    REPO,
    Client,
    Fleet,
    agent_config,
    fleet_agent,
    free_port,
    make_workdir,
    run_agent,
    running_fleet,
    start_agent_daemon,
)
from tests.test_agent_e2e import TOKEN_LIKE

pytestmark = pytest.mark.commands


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with running_fleet(services=True) as running:
        yield running


@pytest.fixture
def operator(fleet: Fleet) -> Client:
    return fleet.client(fleet.service, f"operator-run-{time.monotonic_ns()}")


HOOK = """#!{python}
import json, os, sys
request = json.load(sys.stdin)
with open({log!r}, "a") as log:
    log.write(json.dumps({{"request": request, "thing": os.environ["FLEET_THING"]}}) + "\\n")
reached = dict(request["delta"])
if "temp" in reached:
    reached["temp"] = min(25, reached["temp"])  # the heater cannot go higher
print(json.dumps(reached))
"""


def write_hook(folder: Path) -> tuple[Path, Path]:
    log = folder / "hook.log"
    hook = folder / "apply-desired"
    hook.write_text(HOOK.format(python=sys.executable, log=str(log)))
    hook.chmod(0o755)
    return hook, log


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in time"
        time.sleep(0.1)


def reported(fleet: Fleet, thing: str) -> dict[str, Any]:
    with fleet.registry() as registry:
        row = registry.load_shadow(thing, "")
    if row is None or row.document is None:
        return {}
    return json.loads(row.document).get("state", {}).get("reported", {})


def shadow_version(fleet: Fleet, thing: str) -> int:
    with fleet.registry() as registry:
        row = registry.load_shadow(thing, "")
    return row.version if row else 0


def desire(operator: Client, thing: str, desired: dict[str, Any]) -> None:
    token = f"op-{time.monotonic_ns()}"
    accepted = wire.shadow_reply(thing, "update", "accepted")
    operator.subscribe(accepted)
    operator.publish(
        wire.shadow_topic(thing, "update"),
        json.dumps({"state": {"desired": desired}, "clientToken": token}),
    )
    assert operator.received.wait_for(
        lambda m: m.topic == accepted and json.loads(m.payload).get("clientToken") == token
    )


def thing_of(config: Path) -> str:
    state = config.parent / "state"
    record = wait_until(lambda: Keystore(state).load_record(), what="provisioning")
    return record.thing_name


def stop_daemon(daemon: subprocess.Popen[str]) -> tuple[int, str]:
    daemon.send_signal(signal.SIGTERM)
    _, err = daemon.communicate(timeout=20)
    assert "Traceback" not in err, err
    assert not TOKEN_LIKE.search(err), err
    return daemon.returncode, err


def shadow_cmd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = fleet_agent("shadow", *args, "--config", str(config))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_run_provisions_applies_desired_state_and_serves_the_shadow_commands(
    fleet: Fleet, operator: Client
) -> None:
    folder = make_workdir()
    hook, hook_log = write_hook(folder)
    config = agent_config(fleet, "SN-RUN-1", shadow=f'command = "{hook}"\nreport_interval = 5\n')
    daemon = start_agent_daemon(config)
    try:
        thing = thing_of(config)
        facts = wait_until(lambda: reported(fleet, thing).get("device"), what="device facts")
        assert {"agent_version", "hostname", "os", "uptime_s", "disk_free_mb"} <= set(facts)
        assert (config.parent / "state" / "agent.sock").stat().st_mode & 0o777 == 0o600

        desire(operator, thing, {"led": "on", "temp": 30})
        wait_until(lambda: reported(fleet, thing).get("temp") == 25, what="hook result")
        assert reported(fleet, thing)["led"] == "on"
        calls = [json.loads(line) for line in hook_log.read_text().splitlines()]
        assert calls[0]["thing"] == thing
        assert calls[0]["request"]["delta"] == {"led": "on", "temp": 30}
        assert calls[0]["request"]["shadow"] is None

        proc = shadow_cmd(config, "report", "note=hello", "net.rssi=-61")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("reported (shadow version ")
        assert reported(fleet, thing)["net"] == {"rssi": -61}

        proc = shadow_cmd(config, "get")
        assert proc.returncode == 0, proc.stderr
        document = json.loads(proc.stdout)
        assert document["state"]["reported"]["note"] == "hello"
        assert document["state"]["delta"] == {"temp": 30}  # unreachable: stays, honestly
        assert len(calls) == len(hook_log.read_text().splitlines())  # no re-run loop

        status = fleet_agent("status", "--config", str(config))
        assert status.returncode == 0, status.stderr
        assert f"thing        {thing}" in status.stdout
        assert "agent        running, connected for" in status.stdout
        assert "shadow classic version" in status.stdout
        as_json = json.loads(fleet_agent("status", "--json", "--config", str(config)).stdout)
        assert as_json["runtime"]["state"] == "connected"
        assert (
            as_json["certificate_id"]
            == Keystore(config.parent / "state").load_record().certificate_id
        )

        second = fleet_agent("run", "--config", str(config), timeout=30)
        assert second.returncode == 1
        assert "already running" in second.stderr
    finally:
        code, _ = stop_daemon(daemon)
    assert code == 0
    assert not (config.parent / "state" / "agent.sock").exists()


def test_the_control_socket_can_live_outside_the_state_folder(fleet: Fleet) -> None:
    """agent.control_socket: the commands at the device find the agent there, and the state
    folder (the private key) need not be shared to reach it."""
    socket_path = make_workdir() / "run" / "agent.sock"  # "run" does not exist yet
    config = agent_config(fleet, "SN-SOCKET")
    text = config.read_text().replace("[shadow]", f'control_socket = "{socket_path}"\n[shadow]')
    config.write_text(text)
    state = config.parent / "state"
    daemon = start_agent_daemon(config)
    try:
        thing = thing_of(config)
        wait_until(lambda: runtime_state(config) == "connected", what="running")
        assert socket_path.stat().st_mode & 0o777 == 0o600
        assert socket_path.parent.stat().st_mode & 0o777 == 0o700
        assert not (state / "agent.sock").exists()

        status = fleet_agent("status", "--config", str(config))
        assert status.returncode == 0, status.stderr
        assert "agent        running, connected for" in status.stdout
        as_json = json.loads(fleet_agent("status", "--json", "--config", str(config)).stdout)
        assert as_json["control_socket"] == str(socket_path)

        proc = shadow_cmd(config, "report", "via=socket")
        assert proc.returncode == 0, proc.stderr
        proc = shadow_cmd(config, "get")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["state"]["reported"]["via"] == "socket"
        assert reported(fleet, thing)["via"] == "socket"

        check = fleet_agent("config", "check", "--config", str(config))
        assert f"control  socket {socket_path}" in check.stdout, check.stderr

        # A second agent (its own state) given the same socket must not take it over.
        other = agent_config(fleet, "SN-SOCKET-2")
        other.write_text(
            other.read_text().replace("[shadow]", f'control_socket = "{socket_path}"\n[shadow]')
        )
        second = fleet_agent("run", "--config", str(other))
        assert second.returncode == 2, second.stderr
        assert "another running agent listens on it" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert fleet_agent("status", "--config", str(config)).returncode == 0
    finally:
        code, _ = stop_daemon(daemon)
    assert code == 0
    assert not socket_path.exists()
    assert not (state / "agent.sock").exists()


def test_the_agent_catches_up_after_a_broker_restart() -> None:
    with running_fleet(services=True) as fleet:
        config = agent_config(fleet, "SN-RESTART", shadow='unhandled = "echo"\n')
        daemon = start_agent_daemon(config)
        try:
            thing = thing_of(config)
            wait_until(lambda: reported(fleet, thing).get("device"), what="first sync")
            fleet.stack.stop()
            # While the broker is down, a report is queued on disk by the running agent.
            proc = shadow_cmd(config, "report", "during=outage", "--wait", "1")
            assert proc.returncode == 3, proc.stderr
            assert "saved in the report queue" in proc.stderr
            queue = config.parent / "state" / "shadows" / "classic.pending.json"
            assert "outage" in queue.read_text()

            fleet.stack.start()
            operator = fleet.client(fleet.service, "operator-restart")
            desire(operator, thing, {"mode": "eco"})
            wait_until(
                lambda: (
                    reported(fleet, thing).get("during") == "outage"
                    and reported(fleet, thing).get("mode") == "eco"
                ),
                timeout=60,
                what="catch-up after the restart",
            )
            wait_until(lambda: not queue.exists(), what="queue emptied")
        finally:
            code, _ = stop_daemon(daemon)
        assert code == 0


def test_reports_made_offline_without_a_daemon_are_merged_and_sent_later(fleet: Fleet) -> None:
    config = agent_config(fleet, "SN-OFFLINE")
    assert run_agent(config).returncode == 0
    thing = thing_of(config)
    dead = f"broker.port={free_port()}"

    proc = shadow_cmd(config, "get")
    assert proc.returncode == 1 and "does not exist yet" in proc.stderr

    for assignment in ("a=1", "b.c=true", "a=2"):
        proc = shadow_cmd(config, "report", assignment, "--set", dead)
        assert proc.returncode == 3
        assert "saved in the report queue" in proc.stderr
    queue = config.parent / "state" / "shadows" / "classic.pending.json"
    assert json.loads(queue.read_text())["patches"] == [{"a": 2, "b": {"c": True}}]

    proc = shadow_cmd(config, "report", "d=null")  # reaches the broker: sends the queue first
    assert proc.returncode == 0, proc.stderr
    assert reported(fleet, thing) == {"a": 2, "b": {"c": True}}
    assert shadow_version(fleet, thing) == 1  # the three offline reports were one update
    assert not queue.exists()


def test_a_rejected_report_is_a_clear_error_and_kept(fleet: Fleet) -> None:
    config = agent_config(fleet, "SN-REJECT")
    assert run_agent(config).returncode == 0
    proc = shadow_cmd(config, "report", f"blob={'x' * 9000}")
    assert proc.returncode == 1
    assert "rejected the report: 413" in proc.stderr
    rejected = config.parent / "state" / "shadows" / "classic.rejected.jsonl"
    assert json.loads(rejected.read_text())["rejected"]["code"] == 413
    proc = shadow_cmd(config, "report", "novalue")
    assert proc.returncode == 2 and "is not key=value" in proc.stderr


def test_a_revoked_device_stops_with_its_own_exit_code() -> None:
    with running_fleet(services=True) as fleet:
        config = agent_config(fleet, "SN-REVOKED", shadow="report_interval = 5\n")
        daemon = start_agent_daemon(config)
        try:
            thing = thing_of(config)
            wait_until(lambda: reported(fleet, thing).get("device"), what="first sync")
            revoke = subprocess.run(
                [sys.executable, "-m", "broker.cli", "--dir", str(fleet.pki.root), "revoke", thing],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert revoke.returncode == 0, revoke.stderr
            daemon.wait(timeout=60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
        _, err = daemon.communicate()
        assert daemon.returncode == 4, err
        assert "revoked" in err and "provision --force" in err
        assert "Traceback" not in err
        # `status` says so afterwards, instead of an expiry and a renewal date.
        status = fleet_agent("status", "--config", str(config))
        assert "REFUSED by the broker" in status.stdout and "revoked" in status.stdout
        assert "renewal" not in status.stdout


def test_presence_is_retained_online_then_offline_by_will_or_clean_stop(fleet: Fleet) -> None:
    config = agent_config(fleet, "SN-PRESENCE")
    assert run_agent(config).returncode == 0
    thing = thing_of(config)
    status = wire.status_topic(thing)

    def last_state(client: Client) -> str | None:
        messages = [m for m in client.received.messages if m.topic == status]
        return json.loads(messages[-1].payload)["state"] if messages else None

    daemon = start_agent_daemon(config)
    watcher = fleet.client(fleet.service, "presence-watcher")
    try:
        watcher.subscribe(status)
        wait_until(lambda: last_state(watcher) == "online", what="online")
        daemon.kill()  # no DISCONNECT: the broker publishes the Will
        daemon.communicate(timeout=20)
        wait_until(lambda: last_state(watcher) == "offline", what="Will")
    finally:
        if daemon.poll() is None:
            daemon.kill()
    late = fleet.client(fleet.service, "presence-late")
    late.subscribe(status)
    wait_until(lambda: last_state(late) == "offline", what="retained offline")

    daemon = start_agent_daemon(config)
    wait_until(lambda: last_state(watcher) == "online", what="online again")
    code, _ = stop_daemon(daemon)
    assert code == 0
    wait_until(lambda: last_state(watcher) == "offline", what="clean offline")
    reasons = [json.loads(m.payload).get("reason") for m in watcher.received.messages]
    assert reasons[-1] == "stopped"


def test_a_device_cannot_set_another_things_presence(fleet: Fleet) -> None:
    victim, attacker = "presence-victim", "presence-attacker"
    watcher = fleet.client(fleet.service, "presence-guard")
    watcher.subscribe(wire.status_topic(victim))
    intruder = fleet.client(fleet.device(attacker), attacker)
    info = intruder.publish(wire.status_topic(victim), b'{"state":"online"}', qos=1, retain=True)
    assert getattr(intruder.puback(info), "value", 0) == 0x87  # not authorised
    own = intruder.publish(wire.status_topic(attacker), b'{"state":"online"}', qos=1, retain=True)
    assert getattr(intruder.puback(own), "value", 0x80) < 0x80  # success (maybe no subscriber)
    assert not [m for m in watcher.received.messages if m.topic == wire.status_topic(victim)]


def test_config_check_validates_without_connecting(fleet: Fleet) -> None:
    folder = make_workdir()
    hook, _ = write_hook(folder)
    config = agent_config(fleet, "SN-CHECK", shadow=f'command = "{hook}"\nnames = ["cfg"]\n')
    proc = fleet_agent("config", "check", "--config", str(config), "--set", "broker.port=1")
    assert proc.returncode == 0, proc.stderr  # port 1: nothing listens, nothing is tried
    assert "OK" in proc.stdout and "not provisioned yet" in proc.stdout
    assert "handlers on: classic, cfg" in proc.stdout

    proc = fleet_agent(
        "config", "check", "--config", str(config),
        "--set", "claim.key=/nonexistent/claim.key",
        "--set", "shadow.plugins=no_such_module:setup",
        "--set", "shadow.bogus=1",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown key shadow.bogus" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = fleet_agent(
        "config", "check", "--config", str(config), "--set", "shadow.plugins=no_such_module:setup"
    )
    assert proc.returncode == 2
    assert "cannot import no_such_module" in proc.stderr

    assert run_agent(config).returncode == 0
    key = config.parent / "state" / "device.key"
    key.chmod(0o640)
    proc = fleet_agent("config", "check", "--config", str(config))
    assert proc.returncode == 2
    assert f"run: chmod 600 {key}" in proc.stderr
    key.chmod(0o600)
    status = fleet_agent("status", "--config", str(config))
    assert status.returncode == 0 and "agent        not running" in status.stdout


def runtime_state(config: Path) -> str | None:
    proc = fleet_agent("status", "--json", "--config", str(config))
    runtime = json.loads(proc.stdout).get("runtime") if proc.returncode == 0 else None
    return runtime.get("state") if isinstance(runtime, dict) else None


def test_a_network_cut_queues_reports_on_disk_and_delivers_them_after() -> None:
    """The broker frozen (SIGSTOP: packets go unanswered, like a dead link): the agent
    notices by keepalive, keeps reports on disk, and delivers them once the link is back."""
    with running_fleet(services=True) as fleet:
        config = agent_config(fleet, "SN-CUT")
        daemon = start_agent_daemon(
            config, "--set", "agent.keepalive=5", "--set", "provisioning.timeout=3"
        )
        broker_pid = fleet.stack.broker.pid
        try:
            thing = thing_of(config)
            wait_until(lambda: reported(fleet, thing).get("device"), what="first sync")
            os.kill(broker_pid, signal.SIGSTOP)
            try:
                proc = shadow_cmd(config, "report", "during=cut", "--wait", "1")
                assert proc.returncode == 3, proc.stderr
                queue = config.parent / "state" / "shadows" / "classic.pending.json"
                assert "cut" in queue.read_text()
                wait_until(
                    lambda: runtime_state(config) != "connected", timeout=40, what="cut noticed"
                )
            finally:
                os.kill(broker_pid, signal.SIGCONT)
            wait_until(
                lambda: reported(fleet, thing).get("during") == "cut",
                timeout=90,
                what="queued report delivered",
            )
            wait_until(lambda: not queue.exists(), what="queue emptied")
        finally:
            code, _ = stop_daemon(daemon)
        assert code == 0


def test_an_agent_killed_at_any_moment_of_onboarding_restarts_cleanly(fleet: Fleet) -> None:
    """SIGKILL at staggered moments of the first start, always the same serial (one shared
    claim): the state folder is always either unprovisioned or one consistent set of key,
    certificate and record, and a registration whose key died with the process does not
    block the next start (its certificate never connected, so it is retired)."""
    config = agent_config(fleet, "SN-KILL")
    state = config.parent / "state"
    for delay in (0.3, 0.5, 0.7, 0.9, 1.1, 1.4):
        daemon = start_agent_daemon(config)
        time.sleep(delay)
        daemon.kill()
        daemon.communicate(timeout=20)
        if state.exists():
            Keystore(state).provisioned()  # raises if the set is inconsistent
    daemon = start_agent_daemon(config)
    try:
        wait_until(lambda: runtime_state(config) == "connected", what="running after the kills")
        thing = thing_of(config)
        wait_until(lambda: reported(fleet, thing).get("device"), what="sync after the kills")
    finally:
        code, _ = stop_daemon(daemon)
    assert code == 0
    assert not [p for p in state.iterdir() if p.name.startswith(".tmp-")]


def test_under_systemd_the_agent_notifies_ready_and_feeds_the_watchdog(fleet: Fleet) -> None:
    """A real NOTIFY_SOCKET (a datagram socket, as systemd gives a Type=notify service)."""
    config = agent_config(fleet, "SN-NOTIFY")
    path = make_workdir() / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(20)
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}  # 2 s: ping every 1 s
        daemon = start_agent_daemon(config, env=env)
        try:
            seen: list[str] = []
            while not ("READY=1" in seen and seen.count("WATCHDOG=1") >= 2):
                seen += listener.recv(4096).decode().splitlines()
            assert any(line.startswith("STATUS=running as thing ") for line in seen)
        finally:
            code, _ = stop_daemon(daemon)
        assert code == 0
        stopping: list[str] = []
        with contextlib.suppress(TimeoutError):
            listener.settimeout(2)
            while "STOPPING=1" not in stopping:
                stopping += listener.recv(4096).decode().splitlines()
        assert "STOPPING=1" in stopping


def test_run_says_at_its_default_level_that_it_is_connected(fleet: Fleet) -> None:
    """At the default log level `run` once printed nothing after start: one could not tell
    whether it was connected."""
    config = agent_config(fleet, "SN-SAYS-CONNECTED")
    daemon = start_agent_daemon(config)
    try:
        wait_until(lambda: (config.parent / "state" / "device.pem").exists(), what="onboarded")
        time.sleep(1.0)
    finally:
        code, err = stop_daemon(daemon)
    assert code == 0, err
    assert f"connected to {fleet.config.connect_host}" in err and thing_of(config) in err
