"""agent.systemd against a real AF_UNIX datagram socket playing systemd's notify socket.

Nothing is mocked on the wire: each test binds a socket (a path in a temp folder, or an
abstract-namespace name), points NOTIFY_SOCKET at it and reads what arrives. Timing is never
asserted: the watchdog tests count messages and health checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import Notifier, watchdog_loop

pytestmark = pytest.mark.unit

WAIT = 10.0  # seconds to wait for a datagram that must come (generous: never asserted)


class Listener:
    """The service manager's end: a bound datagram socket that records the sender's pid."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as it goes into NOTIFY_SOCKET

    def receive(self, timeout: float = WAIT) -> tuple[list[str], int | None]:
        """One datagram as its lines, and the sender's pid from SCM_CREDENTIALS."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        return data.decode().split("\n"), pid

    def messages(self, timeout: float = WAIT) -> list[str]:
        return self.receive(timeout)[0]

    def pending(self) -> list[list[str]]:
        """Everything queued now, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass
        return out


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd does
    sock.bind(address)
    return sock


@pytest.fixture
def listener() -> Iterator[Listener]:
    folder = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))  # short: sun_path is 108 B
    path = folder / "notify.sock"
    sock = _bound(str(path))
    try:
        yield Listener(sock, str(path))
    finally:
        sock.close()
        shutil.rmtree(folder)


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"fleet-agent-test-{uuid.uuid4().hex}"
    sock = _bound("\0" + name)
    try:
        yield Listener(sock, "@" + name)
    finally:
        sock.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def notifier_for(
    monkeypatch: pytest.MonkeyPatch, listener: Listener, **env: str
) -> Notifier | None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Notifier.from_environment()


# ------------------------------------------------------------------- messages


def test_ready_status_stopping_and_watchdog_arrive_from_this_process(
    clean_env: pytest.MonkeyPatch, listener: Listener
) -> None:
    notifier = notifier_for(clean_env, listener)
    assert notifier is not None
    try:
        assert notifier.ready("connected to broker:8883 as SN-1")
        lines, pid = listener.receive()
        assert lines == ["READY=1", "STATUS=connected to broker:8883 as SN-1"]
        assert pid == os.getpid()  # what NotifyAccess=main checks

        assert notifier.status("waiting 2.0 s\nto reconnect")
        assert listener.messages() == ["STATUS=waiting 2.0 s to reconnect"]
        assert notifier.watchdog()
        assert listener.messages() == ["WATCHDOG=1"]
        assert notifier.extend_timeout(30)
        assert listener.messages() == ["EXTEND_TIMEOUT_USEC=30000000"]
        assert notifier.stopping()
        assert listener.messages() == ["STOPPING=1"]
        assert notifier.ready()
        assert listener.messages() == ["READY=1"]
    finally:
        notifier.close()


def test_an_abstract_namespace_address_works(
    clean_env: pytest.MonkeyPatch, abstract_listener: Listener
) -> None:
    notifier = notifier_for(clean_env, abstract_listener)
    assert notifier is not None
    assert notifier.address.startswith("@")
    assert notifier.ready("up")
    lines, pid = abstract_listener.receive()
    assert lines == ["READY=1", "STATUS=up"]
    assert pid == os.getpid()
    notifier.close()


# ---------------------------------------------------------------- environment


def test_the_environment_is_unset_after_reading_and_children_do_not_inherit_it(
    clean_env: pytest.MonkeyPatch, listener: Listener
) -> None:
    notifier = notifier_for(
        clean_env, listener, WATCHDOG_USEC="60000000", WATCHDOG_PID=str(os.getpid())
    )
    assert notifier is not None
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; print([k for k in os.environ if k in "
            "('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID')])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "[]"
    # Read once, kept: the notifier still works after the variables are gone.
    assert notifier.watchdog_interval() == 60.0
    assert notifier.watchdog()
    assert listener.messages() == ["WATCHDOG=1"]
    assert Notifier.from_environment() is None  # a second read finds nothing
    notifier.close()


def test_unset_false_leaves_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000"}
    notifier = Notifier.from_environment(env, unset=False)
    assert notifier is not None and notifier.watchdog_interval() == 1.0
    assert env == {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000"}


@pytest.mark.parametrize("address", ["", "relative/notify.sock", "@", "vsock:2:1234"])
def test_no_usable_socket_means_no_notifier(address: str) -> None:
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"} if address else {}
    assert Notifier.from_environment(env) is None
    assert env == {}  # unset all the same


def test_not_under_systemd(clean_env: pytest.MonkeyPatch) -> None:
    assert Notifier.from_environment() is None


# ------------------------------------------------------------------- watchdog


def test_watchdog_pid_must_be_this_process(
    clean_env: pytest.MonkeyPatch, listener: Listener
) -> None:
    other = notifier_for(clean_env, listener, WATCHDOG_USEC="2000000", WATCHDOG_PID="1")
    assert other is not None  # notifications still work, the watchdog is someone else's
    assert other.watchdog_interval() is None
    assert other.watchdog_period() is None
    asyncio.run(watchdog_loop(other, lambda: True))  # returns at once: nothing to ping
    assert listener.pending() == []

    ours = notifier_for(clean_env, listener, WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid()))
    assert ours is not None
    assert ours.watchdog_interval() == 2.0
    assert ours.watchdog_period() == 1.0
    unnamed = notifier_for(clean_env, listener, WATCHDOG_USEC="500000")  # no WATCHDOG_PID
    assert unnamed is not None and unnamed.watchdog_interval() == 0.5


@pytest.mark.parametrize("usec", ["0", "-5", "soon", ""])
def test_a_bad_watchdog_usec_means_no_watchdog(
    clean_env: pytest.MonkeyPatch, listener: Listener, usec: str
) -> None:
    notifier = notifier_for(clean_env, listener, WATCHDOG_USEC=usec)
    assert notifier is not None
    assert notifier.watchdog_interval() is None


def test_watchdog_loop_pings_every_half_interval_only_while_healthy(
    clean_env: pytest.MonkeyPatch, listener: Listener
) -> None:
    notifier = notifier_for(clean_env, listener, WATCHDOG_USEC="8000000")
    assert notifier is not None
    health = iter([True, True, True, False, False, True, False])
    delays: list[float] = []

    def healthy() -> bool:
        return next(health)  # StopIteration after the script: counts as unhealthy

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 9:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watchdog_loop(notifier, healthy, sleep=sleep))
    assert delays == [4.0] * 9  # half of WATCHDOG_USEC
    assert listener.pending() == [["WATCHDOG=1"]] * 4  # one per healthy check
    notifier.close()


def test_watchdog_loop_with_a_tiny_interval_on_a_real_clock(
    clean_env: pytest.MonkeyPatch, listener: Listener
) -> None:
    """Pings arrive on their own; once unhealthy, no more come however many checks pass."""
    notifier = notifier_for(clean_env, listener, WATCHDOG_USEC="100000")  # 0.1 s
    assert notifier is not None
    assert notifier.watchdog_period() == 0.05

    async def scenario() -> tuple[int, int, int]:
        state = {"healthy": True, "checks": 0, "healthy_checks": 0}
        unhealthy_checks = asyncio.Event()

        def healthy() -> bool:
            state["checks"] += 1
            if state["healthy"]:
                state["healthy_checks"] += 1
            elif state["checks"] >= state["flipped_at"] + 3:
                unhealthy_checks.set()
            return state["healthy"]

        task = asyncio.create_task(watchdog_loop(notifier, healthy))
        loop = asyncio.get_running_loop()
        received = 0
        for _ in range(3):
            lines = await loop.run_in_executor(None, listener.messages)
            assert lines == ["WATCHDOG=1"]
            received += 1
        state["healthy"] = False
        state["flipped_at"] = state["checks"]
        await asyncio.wait_for(unhealthy_checks.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return received, state["healthy_checks"], len(listener.pending())

    received, healthy_checks, late = asyncio.run(scenario())
    # Every healthy check sent exactly one ping; the ones not read yet are still queued, and
    # none came from the (three or more) unhealthy checks.
    assert received + late == healthy_checks
    notifier.close()


# --------------------------------------------------------------------- errors


def test_sending_never_raises(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
    try:
        notifier = Notifier(str(folder / "gone.sock"), watchdog_usec=1_000_000)
        with caplog.at_level(logging.DEBUG, logger="fleet.agent.systemd"):
            assert notifier.ready("x") is False
            assert notifier.watchdog() is False
        assert "cannot notify systemd" in caplog.text
        assert all(r.levelno == logging.DEBUG for r in caplog.records)

        # The listener appears later (systemd re-executed): the next message gets through.
        path = folder / "gone.sock"
        sock = _bound(str(path))
        try:
            assert notifier.status("back")
            assert Listener(sock, str(path)).messages() == ["STATUS=back"]
        finally:
            sock.close()
        notifier.close()
    finally:
        shutil.rmtree(folder)


def test_an_unhealthy_check_that_raises_withholds_the_ping(
    clean_env: pytest.MonkeyPatch, listener: Listener
) -> None:
    notifier = notifier_for(clean_env, listener, WATCHDOG_USEC="1000000")
    assert notifier is not None
    calls = []

    def healthy() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("broken check")
        return True

    async def sleep(_: float) -> None:
        if len(calls) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watchdog_loop(notifier, healthy, sleep=sleep))
    assert listener.pending() == [["WATCHDOG=1"]] * 2
    notifier.close()


def test_a_bad_address_is_refused_up_front() -> None:
    with pytest.raises(ValueError):
        Notifier("notify.sock")
