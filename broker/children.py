"""Child processes that end with their parent, and SIGTERM stopping a command as Ctrl-C does.

Every long-lived child the command-line tools start (Mosquitto, the fleet services, the demo's
``fleet-agent run``, ``fleet-sim run``'s worker processes, Locust) must not outlive the process
that started it, however that process ends: a return, an exception, Ctrl-C, SIGTERM from
``kill``, ``timeout``, a CI cancel or a supervisor, or SIGKILL, where no code of ours runs.

- ``preexec`` (for ``subprocess.Popen``) and ``die_with_parent`` (at the start of a
  multiprocessing worker) ask Linux to signal the child when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``). The kernel sends it when the *thread* that forked the child
  ends, so start children from the main thread: ``preexec`` does nothing in another thread.
  The setting is lost when the child changes its user or group, as Mosquitto does when started
  as root (it drops to the ``mosquitto`` user): such a child needs a ``Guard``.
- ``Guard`` is a tiny watcher process (``/bin/sh``) holding the read end of a pipe whose write
  end only this process holds. Any death of this process closes it; the watcher then stops the
  guarded child (SIGTERM, SIGKILL after 10 s). A normal stop disarms it first.
- ``sigterm_like_ctrl_c`` makes SIGTERM do what Ctrl-C does at that moment (it calls the
  SIGINT handler in force: asyncio's, a deferral while stopping, or KeyboardInterrupt), and
  remembers it, so the command can exit 143 (128 + SIGTERM) instead of Ctrl-C's code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import FrameType

PR_SET_PDEATHSIG = 1
GUARD_GRACE_SECONDS = 10


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once here: a preexec function must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    function.restype = ctypes.c_int
    return function


_prctl = _load_prctl()


def supported() -> bool:
    """Whether children can be tied to their parent by the kernel (Linux)."""
    return _prctl is not None


def die_with_parent(signum: int = signal.SIGTERM, parent_pid: int | None = None) -> bool:
    """In a child process: the kernel sends it ``signum`` when its parent dies.

    With ``parent_pid``, a parent that died before this call (the child was orphaned while
    starting) is noticed too: the signal is sent at once. False where Linux is not there."""
    if _prctl is None or _prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
    return True


def preexec(
    signum: int = signal.SIGTERM, then: Callable[[], None] | None = None
) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``signum`` when this process
    dies (after ``then``, another preexec function, if given).

    Call it in the ``Popen`` call itself, from the main thread: the kernel signals the child
    when the forking thread ends, so from another thread this adds nothing (returns ``then``).
    A child orphaned before it runs its program exits at once instead."""
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return then
    prctl, parent = _prctl, os.getpid()

    def child() -> None:
        if then is not None:
            then()
        if prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0 and os.getppid() != parent:
            os._exit(1)

    return child


# $1: the pid to stop; $2: tenths of a second it has after SIGTERM; $3: a label, so the
# watcher's command line names what it guards. One line, as `ps` shows it. A zombie counts
# as gone (it is stopped; reaping it is its new parent's business).
_GUARD_SCRIPT = (
    "alive() { kill -0 $1 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' /proc/$1/status; }; "
    'read -r word; [ "$word" = disarm ] && exit 0; '
    "kill -TERM $1 2>/dev/null || exit 0; i=0; "
    'while alive $1 && [ "$i" -lt "$2" ]; do sleep 0.1; i=$((i + 1)); done; '
    "alive $1 && kill -KILL $1 2>/dev/null; exit 0"
)


class Guard:
    """Stops ``pid`` if this process dies before ``disarm()``: for a child that changes its
    user (the kernel's parent-death signal does not survive that), SIGKILL of us included."""

    def __init__(self, pid: int, label: str = "") -> None:
        read, self._write = os.pipe()  # both ends non-inheritable: no other child holds them
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [
                    *("/bin/sh", "-c", _GUARD_SCRIPT, "fleet-guard"),
                    *(str(pid), str(GUARD_GRACE_SECONDS * 10), label),
                ],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # out of reach of a terminal's Ctrl-C or a group kill
            )
        except BaseException:
            os.close(self._write)
            raise
        finally:
            os.close(read)

    def disarm(self) -> None:
        """The guarded child is stopped (or about to be, by us): the watcher leaves quietly."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._write, b"disarm\n")
        os.close(self._write)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------ SIGTERM

_stop_signal: int | None = None


def sigterm_like_ctrl_c() -> None:
    """From now on SIGTERM stops this process as Ctrl-C would (main thread only)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _stop_signal
    _stop_signal = signum
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)  # what Ctrl-C does right now
    else:  # Ctrl-C ignored (a background job) or the default: a stop all the same
        raise KeyboardInterrupt


def stopped_by_sigterm() -> bool:
    return _stop_signal == signal.SIGTERM


def interrupted_exit_code(ctrl_c_code: int) -> int:
    """The exit code of a command stopped by a signal: 143 after SIGTERM, else Ctrl-C's."""
    return 128 + _stop_signal if _stop_signal is not None else ctrl_c_code
