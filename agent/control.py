"""The running agent's local control socket: how ``fleet-agent shadow|status`` reach it.

Only one connection per thing may exist at the broker (the client id is the thing name), so a
command run at the device while the daemon is up must go through the daemon rather than connect
itself. ``<state>/agent.sock`` (or ``agent.control_socket``) is a Unix socket, mode 0600 in a
0700 folder: only the agent's own user (or root) can use it. One JSON line in, one JSON line
out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from agent.shadow_sync import QueueNotSaved

log = logging.getLogger("fleet.agent.control")

SOCKET_NAME: Final = "agent.sock"
MAX_LINE: Final = 64 * 1024

Operation = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The agent could not be asked, or said no; the message says why. ``permanent``: asking
    again cannot help until someone changes something (the request, the shadow's name, the
    state folder), as opposed to an agent that is busy, not connected or not reachable."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


async def serve(path: Path, operations: dict[str, Operation]) -> asyncio.AbstractServer:
    """Listen on ``path``. A stale socket from a crash is replaced; one a live process still
    answers on is not (another agent configured with the same ``control_socket``: the
    instance lock covers the state folder only)."""
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(str(path))
            except OSError:
                pass  # nobody listens: stale
            else:
                raise FileExistsError(
                    errno.EADDRINUSE, "another running agent listens on it", str(path)
                )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                operation = operations.get(str(request.get("op")))
                if operation is None:
                    raise ControlError(f"unknown operation {request.get('op')!r}", permanent=True)
                answer = await operation(request)
            except ValueError as exc:
                answer = {"ok": False, "error": f"bad request: {exc}", "permanent": True}
            except ControlError as exc:
                answer = {"ok": False, "error": str(exc), "permanent": exc.permanent}
            except QueueNotSaved as exc:
                # A report: in the queue in memory and sent from there, but the state folder
                # refused the write (full, read-only). Say so, naming the file and the cause,
                # instead of closing without an answer.
                log.warning("control request: %s", exc)
                answer = {
                    "ok": False,
                    "error": f"{exc}; the report is sent from memory but not saved "
                    "(lost if the agent stops before it is sent)",
                    "permanent": True,  # until the state folder takes writes again
                }
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(handle, path, limit=MAX_LINE)
    finally:
        os.umask(old_umask)
    return server


def call(path: Path, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Ask the running agent; raise ControlError if it cannot be reached or answers no."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except PermissionError:
        raise ControlError(
            f"not allowed to use {path}; run as the agent's user (or root)"
        ) from None
    except TimeoutError:
        raise ControlError(f"the running agent did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"cannot reach the running agent at {path}: {exc.strerror}") from None
    try:
        answer = json.loads(data)
    except json.JSONDecodeError:
        raise ControlError("the running agent gave no answer") from None
    if not isinstance(answer, dict):
        raise ControlError("the running agent gave an unexpected answer")
    if not answer.get("ok"):
        raise ControlError(
            str(answer.get("error", "refused")), permanent=answer.get("permanent") is True
        )
    return answer
