"""One real edge agent in the demo: a `fleet-agent run` process, as a device would run it.

Either the demo starts it (AgentProcess): it gets the same files a factory image would hold
(the CA and the shared claim certificate) and a config written here; it makes its own key and
CSR, onboards, then keeps its shadow in sync, echoing desired configuration as reached
(``unhandled = "echo"``). Or it runs already, in another container (RunningAgent), and the demo
reaches only its control socket. Either way the demo asks it how it is through that socket,
the way `fleet-agent status` does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import agent
from agent import control
from agent.keystore import Keystore, KeystoreError
from broker import children
from broker.mosquitto import last_lines
from broker.pki import PkiPaths

# The folder that holds the `agent` package, so `python -m agent.cli` finds the same code
# whether the project is installed or run from a checkout.
_CODE_ROOT = Path(agent.__file__).resolve().parent.parent


def _toml_string(value: object) -> str:
    """A TOML basic string (paths may hold quotes or backslashes)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class DemoAgent(Protocol):
    """What the demo needs of its fleet-agent, started by it or not."""

    owned: bool
    process: subprocess.Popen[bytes] | None  # None: not started, or not the demo's

    def start(self) -> None: ...
    def exit_code(self) -> int | None: ...
    def thing(self) -> str | None: ...
    def status(self) -> dict[str, Any] | None: ...
    def log_tail(self, lines: int = 4) -> str: ...
    def stop(self, timeout: float = 15.0) -> int | None: ...


class AgentProcess:
    owned = True  # the demo started it, and stops it

    def __init__(
        self, folder: Path, pki: PkiPaths, host: str, port: int, *, serial: str, model: str
    ) -> None:
        self.folder = folder
        self.config = folder / "agent.toml"
        self.state = folder / "state"
        self.log = folder / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        # A folder from an earlier demo holds credentials of a CA that no longer exists.
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.config.write_text(
            "# Written by fleet-sim demo: a device that holds only the CA and the claim.\n"
            "[broker]\n"
            f"endpoint = {_toml_string(host)}\n"
            f"port = {port}\n"
            f"ca_file = {_toml_string(pki.ca_cert)}\n"
            "[claim]\n"
            f"certificate = {_toml_string(pki.claim_cert)}\n"
            f"key = {_toml_string(pki.claim_key)}\n"
            "[provisioning]\n"
            "timeout = 10\n"
            "[provisioning.parameters]\n"
            f"SerialNumber = {_toml_string(serial)}\n"
            f"DeviceModel = {_toml_string(model)}\n"
            "[agent]\n"
            f"state_dir = {_toml_string(self.state)}\n"
            'log_level = "info"\n'
            "[shadow]\n"
            # Desired keys are pure configuration here: reached as soon as they are received.
            'unhandled = "echo"\n'
        )

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_CODE_ROOT), env.get("PYTHONPATH", "")) if p
        )
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the demo, which stops it
                # SIGTERM, its clean stop, if the demo dies without stopping it (even SIGKILL)
                preexec_fn=children.preexec(signal.SIGTERM),
            )

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def thing(self) -> str | None:
        """The thing it registered as, once its credentials are stored."""
        try:
            record = Keystore(self.state).load_record()
        except (KeystoreError, OSError):
            return None  # being written: ask again
        return record.thing_name if record else None

    def status(self) -> dict[str, Any] | None:
        """The running agent's own view (state, connections made, ...), or None."""
        return RunningAgent(self.state / control.SOCKET_NAME).status()

    def log_tail(self, lines: int = 4) -> str:
        return last_lines(self.log, lines).replace("\n", " | ")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, as systemd would; killed if it does not stop in time. Its exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                return None
        return process.returncode


class RunningAgent:
    """A fleet-agent the demo did not start, known by its control socket only.

    The socket answers once the agent has onboarded and runs as its thing; before that (or if
    the agent is not running at all) there is nothing to ask, and the demo waits.
    """

    owned = False

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.process: subprocess.Popen[bytes] | None = None
        self._last_problem = "no answer yet"

    def start(self) -> None:
        """Nothing to start: it runs on its own."""

    def exit_code(self) -> int | None:
        return None  # out of sight: a stopped agent shows as one that does not answer

    def thing(self) -> str | None:
        status = self.status()
        thing = status.get("thing") if status else None
        return thing if isinstance(thing, str) else None

    def status(self) -> dict[str, Any] | None:
        try:
            answer = control.call(self.socket_path, {"op": "status"}, timeout=5)
        except control.ControlError as exc:
            self._last_problem = str(exc)
            return None
        status = answer.get("status")
        return status if isinstance(status, dict) else None

    def log_tail(self, lines: int = 4) -> str:
        return f"its control socket: {self._last_problem} (see the agent's own log)"

    def stop(self, timeout: float = 15.0) -> int | None:
        return None  # not ours to stop
