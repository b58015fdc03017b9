"""Built-in reporters: device facts for ``reported``, read from the OS on start and on an interval.

A reporter is a callable returning a patch for ``reported`` (facts it cannot read are left out,
never guessed). `device_facts` is the built-in one; it nests everything under one key so it
never collides with the application's own state.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent import distribution_version

Reporter = Callable[[], Mapping[str, Any]]

_STARTED = time.monotonic()


agent_version = distribution_version


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:
        return platform.system()


def _system_uptime() -> int | None:
    try:
        return int(float(Path("/proc/uptime").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def _memory_available_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_facts(disk_path: Path = Path("/")) -> dict[str, Any]:
    """Agent version, uptimes, host name, OS, kernel, architecture, free disk and memory."""
    facts: dict[str, Any] = {
        "agent_version": agent_version(),
        "agent_uptime_s": int(time.monotonic() - _STARTED),
        "hostname": socket.gethostname(),
        "os": _os_name(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
    }
    uptime = _system_uptime()
    if uptime is not None:
        facts["uptime_s"] = uptime
    with contextlib.suppress(OSError):
        facts["disk_free_mb"] = shutil.disk_usage(disk_path).free // (1024 * 1024)
    memory = _memory_available_mb()
    if memory is not None:
        facts["memory_available_mb"] = memory
    with contextlib.suppress(OSError):
        facts["load_1m"] = round(os.getloadavg()[0], 2)
    return facts


def device_reporter(key: str = "device", disk_path: Path = Path("/")) -> Reporter:
    """A reporter putting `device_facts` under ``reported.<key>``."""

    def report() -> dict[str, Any]:
        return {key: device_facts(disk_path)}

    return report
