"""A throw-away broker side on this machine: the one local stack of `fleet-sim run` and
`fleet-sim locust --local`.

A fresh PKI and registry in a private temporary folder, Mosquitto with the plugin and the
fleet services on a free loopback port, stopped at the end; the folder is removed then unless
the caller keeps it (``keep``: asked for, or its run or the start failed).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from broker import bootstrap
from broker.config import BrokerConfig, load_config
from broker.mosquitto import RunFiles, broker_user, free_port
from broker.pki import PkiPaths
from broker.stack import Stack

HOST = "127.0.0.1"


@dataclass
class LocalBrokerSide:
    folder: Path
    pki: PkiPaths
    config: BrokerConfig
    stack: Stack
    #: Leave the folder in place at the end (the caller asked, or its run failed).
    keep: bool = False
    #: The start failed (``on_exit`` may keep the folder for its logs).
    failed: bool = False

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.config.run_dir)


def private_folder(prefix: str) -> Path:
    """A new temporary folder that is ours only (0700). As root, Mosquitto drops to its own
    user, which must reach its key and the registry in there: then 0710 with that user's
    group, so it may traverse the folder but not list it, and nobody else may even do that."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))  # 0700 whatever the umask
    user = broker_user()
    if user not in (None, "root"):
        os.chown(folder, -1, pwd.getpwnam(user).pw_gid)
        folder.chmod(0o710)
    return folder


@contextlib.contextmanager
def local_broker_side(
    prefix: str,
    *,
    announce: Callable[[LocalBrokerSide], None] | None = None,
    on_exit: Callable[[LocalBrokerSide], None] | None = None,
) -> Iterator[LocalBrokerSide]:
    """A started local broker side. ``announce`` runs before the start (say where it is),
    ``on_exit`` once it has stopped, or failed to start, before the folder goes (copy its
    logs, or set ``keep``)."""
    folder = private_folder(prefix)
    side: LocalBrokerSide | None = None
    try:
        pki = bootstrap.initialize(folder / "certs")
        config = load_config(pki.root, port=free_port(HOST), bind_address=HOST)
        side = LocalBrokerSide(folder, pki, config, Stack(config, with_services=True))
        if announce is not None:
            announce(side)
        try:
            side.stack.start()  # stops what it started if it fails
        except Exception:
            side.failed = True
            raise
        try:
            yield side
        finally:
            side.stack.stop()
    finally:
        if side is not None and on_exit is not None:
            on_exit(side)
        if side is None or not side.keep:
            shutil.rmtree(folder, ignore_errors=True)
