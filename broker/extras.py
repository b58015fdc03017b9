"""Which optional part of the distribution a command needs, said in one line when it is missing.

A device installs the agent alone (``pip install mqtt-fleet``: cryptography and paho-mqtt);
the broker side, the simulator and Locust are extras (pyproject.toml). A command that needs one
checks for it before it starts, instead of failing on an import deep inside.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable


class MissingExtra(Exception):
    """The message names the modules that are missing and the pip command that adds them."""


def require(extra: str, modules: Iterable[str], *, command: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"{command} needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install 'mqtt-fleet[{extra}]' (from a clone: pip install '.[{extra}]')"
        )
