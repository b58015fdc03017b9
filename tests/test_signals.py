"""Stopping the tools by signal, as `kill`, `timeout`, a CI cancel or a supervisor do (U2).

Each command runs as a real subprocess with its real children (Mosquitto, the services, the
fleet-agent, the workers, Locust). SIGTERM must stop it as Ctrl-C does, within a bound, with
every child gone, the port free again and `run`'s report written; SIGKILL of the command must
take its children along (the kernel's parent-death signal, and a guard for Mosquitto, which
drops to its own user as root and so loses that signal).

The children are known by their ancestry, snapshot before the signal, with their start times
(a pid may be reused once they are gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker import children
from broker.mosquitto import BrokerError, check_port_free, free_port
from tests.fleet import AGENT_ENV, REPO, make_workdir
from tests.test_demo import processes_using

pytestmark = [
    pytest.mark.commands,
    pytest.mark.skipif(not children.supported(), reason="the parent-death signal is Linux's"),
]

START_TIMEOUT = 60  # until the command's children run
STOP_TIMEOUT = 30  # the command must exit this long after SIGTERM
ORPHAN_TIMEOUT = 15  # its children must be gone this long after it was killed
SIGTERM_EXIT = 128 + signal.SIGTERM

# ----------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, str, int, str]]:
    """pid -> (parent pid, state, start time, command line) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]), command)
    return table


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (start time, command line) of the live processes below ``root``."""
    table = _proc_table()
    found: dict[int, tuple[int, str]] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state, started, command) in table.items():
            if ppid == parent and state != "Z" and pid not in found:
                found[pid] = (started, command)
                frontier.append(pid)
    return found


def survivors(recorded: dict[int, tuple[int, str]]) -> list[str]:
    """Those of ``recorded`` that still run (the same processes: same start time)."""
    table = _proc_table()
    return [
        f"{pid} {command}"
        for pid, (started, command) in recorded.items()
        if pid in table and table[pid][2] == started and table[pid][1] != "Z"
    ]


def port_free(port: int) -> bool:
    try:
        check_port_free("127.0.0.1", port)
    except BrokerError:
        return False
    return True


@dataclass
class Command:
    """One command line tool run, its output in files (a full pipe must not block it)."""

    args: list[str]
    folder: Path
    process: subprocess.Popen[bytes] = field(init=False)
    children: dict[int, tuple[int, str]] = field(default_factory=dict)
    seen: dict[int, tuple[int, str]] = field(default_factory=dict)  # for the cleanup

    def __post_init__(self) -> None:
        with open(self.folder / "stdout", "wb") as out, open(self.folder / "stderr", "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *self.args],
                cwd=REPO,
                env={**AGENT_ENV, "COLUMNS": "200"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a group of its own, as a shell job or CI step has
            )

    @property
    def stdout(self) -> str:
        return (self.folder / "stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.folder / "stderr").read_text(errors="replace")

    def wait_children(self, *needles: str, settle: float = 0.0) -> None:
        """Until a child runs for every needle (a part of its command line); then snapshot
        every descendant, ``settle`` seconds later."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.seen.update(found := descendants(self.process.pid))
            commands = [command for _, command in found.values()]
            missing = [n for n in needles if not any(n in c for c in commands)]
            if not missing:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"no child {missing} (exit {self.process.poll()}):\n"
                    + self.stdout[-2000:]
                    + self.stderr[-2000:]
                )
            time.sleep(0.1)
        time.sleep(settle)
        self.children = descendants(self.process.pid)
        self.seen.update(self.children)

    def wait_output(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + START_TIMEOUT
        while not (found := re.search(pattern, self.stdout)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} in the output:\n{self.stdout[-2000:]}{self.stderr}")
            time.sleep(0.1)
        return found

    def signal(self, signum: int, *, group: bool = False) -> None:
        if group:  # what `timeout`, a terminal or a CI runner does
            os.killpg(self.process.pid, signum)
        else:  # `kill PID`
            self.process.send_signal(signum)

    def exit_code(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout:.0f} s after the signal:\n{self.stdout[-2000:]}")

    def wait_children_gone(self, timeout: float = ORPHAN_TIMEOUT) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := survivors(self.children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def cleanup(self) -> None:
        """Whatever happened: nothing of it keeps running."""
        if self.process.poll() is None:
            self.seen.update(descendants(self.process.pid))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in survivors(self.seen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.split()[0]), signal.SIGKILL)


@pytest.fixture
def run_command() -> Iterator[Callable[..., Command]]:
    started: list[tuple[Command, Path]] = []

    def start(*args: str) -> Command:
        folder = make_workdir()
        command = Command(list(args), folder)
        started.append((command, folder))
        return command

    yield start
    for command, folder in started:
        command.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def assert_no_traceback(command: Command) -> None:
    assert "Traceback" not in command.stderr + command.stdout, command.stderr[-3000:]


def kinds(command: Command) -> str:
    return " | ".join(c for _, c in command.children.values())


# ------------------------------------------------------------------------------ the tools


def demo_command(run_command: Callable[..., Command]) -> tuple[Command, int, Path]:
    folder = make_workdir()
    port = free_port()
    demo = run_command(
        "simulator.cli", "demo", "--devices", "200", "--port", str(port), "--dir", str(folder)
    )
    demo.wait_children("mosquitto", "broker.services", "agent.cli run")
    return demo, port, folder


@pytest.mark.parametrize("group", [False, True], ids=["kill-pid", "group-like-timeout"])
def test_sigterm_stops_the_demo_and_everything_it_started(
    run_command: Callable[..., Command], group: bool
) -> None:
    demo, port, folder = demo_command(run_command)
    try:
        demo.signal(signal.SIGTERM, group=group)
        assert demo.exit_code() == SIGTERM_EXIT, demo.stderr
        assert_no_traceback(demo)
        assert demo.wait_children_gone(timeout=5) == [], kinds(demo)
        assert processes_using(folder) == []
        assert port_free(port)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


RUN = ("simulator.cli", "run", "--devices", "40", "--rate", "40", "--processes", "2")
RUN_OPTIONS = ("--hold", "60", "--update-interval", "1")


def start_run(run_command: Callable[..., Command]) -> tuple[Command, Path, int, Path]:
    folder = make_workdir()
    out = folder / "report"
    run = run_command(*RUN, *RUN_OPTIONS, "--out", str(out))
    found = run.wait_output(r"local broker side on 127\.0\.0\.1:(\d+) \(throw-away PKI in (\S+),")
    # Two workers and the resource tracker, besides the broker side.
    run.wait_children("mosquitto", "broker.services", "resource_tracker")
    deadline = time.monotonic() + START_TIMEOUT
    while sum("multiprocessing-fork" in c for _, c in descendants(run.process.pid).values()) < 2:
        assert time.monotonic() < deadline, run.stdout[-2000:]
        time.sleep(0.1)
    run.wait_children("multiprocessing-fork", settle=1.5)  # a few devices onboard
    return run, out, int(found.group(1)), Path(found.group(2))


@pytest.mark.parametrize("group", [False, True], ids=["kill-pid", "group-like-timeout"])
def test_sigterm_stops_a_run_which_still_writes_its_report(
    run_command: Callable[..., Command], group: bool
) -> None:
    run, out, port, workdir = start_run(run_command)
    try:
        run.signal(signal.SIGTERM, group=group)
        assert run.exit_code() == SIGTERM_EXIT, run.stdout[-3000:] + run.stderr
        assert_no_traceback(run)
        assert run.wait_children_gone(timeout=5) == [], kinds(run)
        report = json.loads((out / "report.json").read_text())
        assert report["interrupted"] is True
        # The workers stopped gracefully: their figures reached the report.
        assert report["devices"]["onboarded"] > 0, report["devices"]
        assert report["worker_errors"] == {}
        assert "(interrupted)" in run.stdout
        assert port_free(port)
        assert not workdir.exists()  # the throw-away broker side is removed
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def test_sigterm_while_the_broker_side_starts_still_ends_with_a_report(
    run_command: Callable[..., Command],
) -> None:
    """SIGTERM as soon as `run` starts its local broker side: it lets that start finish,
    starts no device, stops it, and writes a report that says it was interrupted."""
    folder = make_workdir()
    out = folder / "report"
    run = run_command(*RUN, *RUN_OPTIONS, "--out", str(out))
    found = run.wait_output(r"local broker side on 127\.0\.0\.1:(\d+) \(throw-away PKI in (\S+),")
    try:
        run.signal(signal.SIGTERM)
        assert run.exit_code() == SIGTERM_EXIT, run.stdout[-3000:] + run.stderr
        assert_no_traceback(run)
        assert run.wait_children_gone(timeout=5) == [], kinds(run)
        report = json.loads((out / "report.json").read_text())
        assert report["interrupted"] is True
        assert report["devices"]["onboarded"] == 0, report["devices"]
        assert port_free(int(found.group(1)))
        assert not Path(found.group(2)).exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


LOCUST = ("simulator.cli", "locust", "--local", "--headless", "-u", "3", "-r", "3", "-t", "60s")


def start_locust(run_command: Callable[..., Command]) -> tuple[Command, int, Path, Path]:
    csv = make_workdir() / "run"
    locust = run_command(*LOCUST, "--csv", str(csv), "--fleet-update-interval", "0.3")
    found = locust.wait_output(r"local broker side on 127\.0\.0\.1:(\d+) \((\S+)\)")
    locust.wait_children("mosquitto", "broker.services", "locustfile.py", settle=2.0)
    return locust, int(found.group(1)), Path(found.group(2)), csv


@pytest.mark.parametrize("group", [False, True], ids=["kill-pid", "group-like-timeout"])
def test_sigterm_stops_locust_and_its_local_broker_side(
    run_command: Callable[..., Command], group: bool
) -> None:
    locust, port, folder, csv = start_locust(run_command)
    try:
        locust.signal(signal.SIGTERM, group=group)
        assert locust.exit_code() == SIGTERM_EXIT, locust.stdout[-3000:] + locust.stderr[-3000:]
        assert_no_traceback(locust)
        assert locust.wait_children_gone(timeout=5) == [], kinds(locust)
        assert port_free(port)
        assert not folder.exists()
        # Locust stopped as on Ctrl-C: its statistics are written.
        assert Path(f"{csv}_stats.csv").is_file()
    finally:
        shutil.rmtree(csv.parent, ignore_errors=True)


def start_up(run_command: Callable[..., Command]) -> tuple[Command, int, Path]:
    certs = make_workdir() / "certs"
    init = subprocess.run(
        [sys.executable, "-m", "broker.cli", "--dir", str(certs), "init"],
        cwd=REPO,
        env=AGENT_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    port = free_port()
    up = run_command(
        "broker.cli", "--dir", str(certs), "up", "--port", str(port), "--bind", "127.0.0.1"
    )
    up.wait_output(rf"mqtts://127\.0\.0\.1:{port}")
    up.wait_children("mosquitto", "broker.services")
    return up, port, certs


def test_sigterm_stops_fleet_broker_up(run_command: Callable[..., Command]) -> None:
    up, port, certs = start_up(run_command)
    try:
        up.signal(signal.SIGTERM)
        assert up.exit_code() == 0, up.stderr
        assert_no_traceback(up)
        assert up.wait_children_gone(timeout=5) == [], kinds(up)
        assert port_free(port)
        assert not (certs / "run" / "fleet-broker.json").exists()
    finally:
        shutil.rmtree(certs.parent, ignore_errors=True)


# ---------------------------------------------------------------------------- SIGKILL


def _demo(run_command: Callable[..., Command]) -> tuple[Command, int, list[Path]]:
    demo, port, folder = demo_command(run_command)
    return demo, port, [folder]


def _run(run_command: Callable[..., Command]) -> tuple[Command, int, list[Path]]:
    run, out, port, workdir = start_run(run_command)
    return run, port, [out.parent, workdir]


def _locust(run_command: Callable[..., Command]) -> tuple[Command, int, list[Path]]:
    locust, port, folder, csv = start_locust(run_command)
    return locust, port, [folder, csv.parent]


def _up(run_command: Callable[..., Command]) -> tuple[Command, int, list[Path]]:
    up, port, certs = start_up(run_command)
    return up, port, [certs.parent]


@pytest.mark.parametrize(
    "start", [_demo, _run, _locust, _up], ids=["demo", "run", "locust-local", "broker-up"]
)
def test_sigkill_of_the_command_takes_its_children_along(
    run_command: Callable[..., Command],
    start: Callable[[Callable[..., Command]], tuple[Command, int, list[Path]]],
) -> None:
    command, port, folders = start(run_command)
    try:
        assert len(command.children) >= 2, kinds(command)
        command.signal(signal.SIGKILL)  # no code of ours runs: the kernel and the guard act
        command.process.wait(5)
        assert command.wait_children_gone() == [], kinds(command)
        deadline = time.monotonic() + 5
        while not port_free(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_free(port)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------ the parts


def test_a_disarmed_guard_leaves_its_child_alone() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        guard = children.Guard(child.pid, "test")
        assert guard.process is not None
        watcher = guard.process
        guard.disarm()
        assert watcher.returncode == 0
        time.sleep(0.2)
        assert child.poll() is None
        guard.disarm()  # twice is harmless
    finally:
        child.kill()
        child.wait()


@pytest.mark.unit
def test_no_parent_death_signal_for_a_child_forked_from_a_passing_thread() -> None:
    """The kernel would signal it when that thread ends, while this process lives on."""
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(children.preexec(signal.SIGTERM)))
    thread.start()
    thread.join()
    assert results == [None]
    assert callable(children.preexec(signal.SIGTERM))  # the main thread's children get it
