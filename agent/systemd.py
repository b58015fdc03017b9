"""systemd integration for ``Type=notify`` services with a watchdog, without libsystemd.

systemd passes a service an ``AF_UNIX`` datagram socket in ``$NOTIFY_SOCKET`` (a path, or an
abstract-namespace name written with a leading ``@``). The service tells it how it is doing by
sending newline-separated ``KEY=VALUE`` assignments there: ``READY=1`` once start-up is done,
``STATUS=...`` for ``systemctl status``, ``STOPPING=1`` when shutting down and ``WATCHDOG=1``
at least every ``WatchdogSec=`` (``$WATCHDOG_USEC``), or systemd kills and (per ``Restart=``)
restarts it. With ``NotifyAccess=main`` only datagrams from the main process count; systemd
learns the sender's pid from the kernel (``SO_PASSCRED`` on its end), nothing to send for it.

`Notifier.from_environment` reads those variables once and removes them from ``os.environ``
(as ``sd_notify(unset_environment=1)`` does), so the processes the agent starts (handler hooks)
neither inherit them nor can speak for the agent. Outside systemd it returns None; callers write
``notifier = Notifier.from_environment()`` and ``if notifier: notifier.ready(...)``.

Sending never raises: systemd going away (daemon-reexec) or a full queue must not take the
agent down. A failed send is logged at debug level and reported as False.

`watchdog_loop` pings at half the watchdog interval (as sd_watchdog_enabled(3) advises) while a
health check passes. It runs on the agent's event loop, so a wedged loop stops the pings too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Final

log = logging.getLogger("fleet.agent.systemd")

NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"
WATCHDOG_USEC: Final = "WATCHDOG_USEC"
WATCHDOG_PID: Final = "WATCHDOG_PID"
SEND_TIMEOUT: Final = 1.0  # seconds; a datagram to a local socket only blocks if its queue is full
MAX_STATUS: Final = 1024  # characters; systemd shows one line, keep the datagram small


def _socket_address(value: str) -> str | None:
    """The address to send to, or None if ``value`` is not one this module can use."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # empty, relative, or vsock:... (systemd 253+ for VMs): not supported here


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line[:MAX_STATUS]


class Notifier:
    """Messages to the service manager over ``$NOTIFY_SOCKET``.

    ``watchdog_usec`` is the watchdog timeout systemd gave this process (``$WATCHDOG_USEC``,
    already checked against ``$WATCHDOG_PID``), or None when no watchdog applies.
    """

    def __init__(self, address: str, *, watchdog_usec: int | None = None) -> None:
        target = _socket_address(address)
        if target is None:
            raise ValueError(f"not a notify socket address: {address!r}")
        self.address = address
        self._target = target
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None

    # ------------------------------------------------------------ construction

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier | None:
        """The notifier systemd set up for this process, or None when not run by systemd
        (or under ``Type=`` other than notify, which passes no socket).

        Reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``environ``
        (default ``os.environ``) and, unless ``unset`` is False, removes all three from it
        so child processes do not inherit them. The watchdog applies only when
        ``WATCHDOG_USEC`` is a positive integer and ``WATCHDOG_PID``, if set, is this process.
        """
        env = os.environ if environ is None else environ
        address = env.get(NOTIFY_SOCKET, "")
        usec_text = env.get(WATCHDOG_USEC)
        pid_text = env.get(WATCHDOG_PID)
        if unset:
            for name in (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID):
                env.pop(name, None)
        if not address:
            return None
        if _socket_address(address) is None:
            log.debug("ignoring NOTIFY_SOCKET=%r: not a path or an abstract address", address)
            return None
        return cls(address, watchdog_usec=_watchdog_usec(usec_text, pid_text))

    # ---------------------------------------------------------------- messages

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was sent."""
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec
                sock.settimeout(SEND_TIMEOUT)
                self._sock = sock
            self._sock.sendto(message, self._target)
        except OSError as exc:
            log.debug("cannot notify systemd at %s: %s", self.address, exc)
            self.close()  # a fresh socket next time
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is done (``Type=notify`` units count as started from here)."""
        return self.send("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        """One line for ``systemctl status`` (newlines and runs of spaces become one space)."""
        return self.send(*self._status(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutting down (systemd then expects the process to exit, not a watchdog ping)."""
        return self.send("STOPPING=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """Re-reading configuration; send `ready` again when done."""
        return self.send("RELOADING=1", *self._status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop timeout fires (systemd >= 236)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """Keep-alive ping: the service is healthy."""
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """Tell systemd the service is unhealthy now (acts as if the watchdog expired)."""
        return self.send("WATCHDOG=trigger")

    # ---------------------------------------------------------------- watchdog

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (``WatchdogSec=``), or None if there is none.
        Ping at least twice per interval: see `watchdog_period`."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def watchdog_period(self) -> float | None:
        """How often `watchdog_loop` pings: half the interval."""
        interval = self.watchdog_interval()
        return None if interval is None else interval / 2

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier({self.address!r}, watchdog_usec={self._watchdog_usec})"

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        return () if text is None else (f"STATUS={_one_line(text)}",)


def _watchdog_usec(usec_text: str | None, pid_text: str | None) -> int | None:
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.debug("ignoring WATCHDOG_USEC=%r: not an integer", usec_text)
        return None
    if usec <= 0:
        return None
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError:
            log.debug("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", pid_text)
            return None
        if pid != os.getpid():
            log.debug("ignoring the watchdog: it is for pid %d, this is %d", pid, os.getpid())
            return None
    return usec


async def watchdog_loop(
    notifier: Notifier,
    healthy: Callable[[], bool],
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Ping ``WATCHDOG=1`` every half watchdog interval while ``healthy()`` is true, until
    cancelled. Returns at once when systemd set no watchdog.

    An unhealthy check (False, or an exception) skips the ping, so systemd restarts the agent
    if it stays unhealthy for the whole ``WatchdogSec=``; pings resume if it recovers first.
    ``healthy`` runs on the event loop and must be quick. ``sleep`` is for tests.
    """
    period = notifier.watchdog_period()
    if period is None:
        return
    was_healthy = True
    while True:
        try:
            ok = bool(healthy())
        except Exception:
            log.debug("the watchdog health check failed", exc_info=True)
            ok = False
        if ok:
            if not was_healthy:
                log.warning("healthy again: resuming the systemd watchdog pings")
            notifier.watchdog()
        elif was_healthy:
            log.warning(
                "not healthy: withholding the systemd watchdog ping (systemd restarts the agent "
                "if this lasts %.0f s)",
                notifier.watchdog_interval(),
            )
        was_healthy = ok
        await sleep(period)
