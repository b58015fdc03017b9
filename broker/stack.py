"""The local fleet cloud as one unit: Mosquitto with the plugin, plus the services process.

``Stack.start`` brings both up and proves the broker accepts a mutual-TLS connection;
``Stack.supervise`` keeps them running until asked to stop (restarting the services if they
crash, stopping everything if the broker dies); ``Stack.stop`` leaves no process behind.

Neither child outlives the process that holds the Stack, even one killed by SIGKILL
(broker/children.py): the services get SIGTERM from the kernel when it dies; Mosquitto, which
drops to its own user when started as root (and so loses that signal), has a Guard. Start
the Stack, and restart the services, from the main thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent import wire
from agent.durable import write_atomic
from broker import bootstrap, children
from broker.config import BrokerConfig
from broker.mosquitto import (
    BrokerError,
    MosquittoProcess,
    RunFiles,
    check_broker_can_reach,
    check_port_free,
    find_mosquitto,
    last_lines,
    log_size,
    plugin_library,
    prepare_run_dir,
)
from broker.mqtt import ConnectError, connect, disconnect, tls_context
from broker.pki import PkiPaths

SERVICES_READY_TIMEOUT = 20.0
MAX_SERVICE_RESTARTS = 5


@dataclass(frozen=True)
class RunningState:
    """What ``fleet-broker up`` writes for ``status`` and ``down``."""

    supervisor_pid: int
    mosquitto_pid: int
    services_pid: int
    host: str
    port: int
    started_at: float
    services_restarts: int = 0

    @classmethod
    def read(cls, files: RunFiles) -> RunningState | None:
        try:
            return cls(**json.loads(files.state.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, files: RunFiles) -> None:
        write_atomic(files.state, json.dumps(self.__dict__).encode(), 0o644)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_pki(pki: PkiPaths) -> None:
    missing = [
        p.name for p in (pki.ca_cert, pki.broker_cert, pki.broker_key, pki.crl) if not p.exists()
    ]
    if missing or not pki.registry.exists():
        raise BrokerError(
            f"no PKI in {pki.root} (missing {', '.join(missing) or 'registry'}): "
            f"run fleet-broker init --dir {pki.root}"
        )


class Stack:
    def __init__(
        self, config: BrokerConfig, *, config_file: Path | None = None, with_services: bool = True
    ) -> None:
        self.config = config
        self.with_services = with_services
        self.config_file = config_file
        self.pki = PkiPaths(config.pki_dir)
        self.files = RunFiles(config.run_dir)
        self.broker = MosquittoProcess(config, self.files)
        self.services: subprocess.Popen[bytes] | None = None
        self._broker_guard: children.Guard | None = None
        self._services_guard: children.Guard | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        require_pki(self.pki)
        find_mosquitto()
        plugin_library()
        running = RunningState.read(self.files)
        if running and pid_alive(running.supervisor_pid):
            raise BrokerError(
                f"the broker side is already running from {self.pki.root} "
                f"(pid {running.supervisor_pid}, port {running.port}): fleet-broker down first"
            )
        check_port_free(self.config.bind_address, self.config.port)
        bootstrap.refresh_crl(self.pki.root)
        check_broker_can_reach(self.config)
        prepare_run_dir(self.config)
        self.broker.start()
        try:
            self._broker_guard = children.Guard(self.broker.pid, str(self.files.conf))
            self.broker.wait_listening()
            self._probe()
            if self.with_services:
                self._start_services()
        except BaseException:
            self.stop()
            raise
        self._started_at = time.time()
        self._write_state(restarts=0)

    def _write_state(self, *, restarts: int) -> None:
        """For `status` and `down`; rewritten when the services are restarted (new pid)."""
        RunningState(
            supervisor_pid=os.getpid(),
            mosquitto_pid=self.broker.pid,
            services_pid=self.services.pid if self.services else 0,
            host=self.config.connect_host,
            port=self.config.port,
            started_at=self._started_at,
            services_restarts=restarts,
        ).write(self.files)

    def _probe(self) -> None:
        """A real mutual-TLS MQTT connection with the service identity."""
        try:
            client = connect(
                self.config.connect_host,
                self.config.port,
                context=tls_context(self.pki.ca_cert, self.pki.service_cert, self.pki.service_key),
                client_id=wire.operator_client_id("probe"),
            )
        except ConnectError as exc:
            raise BrokerError(
                f"the broker is up but refused a mutual-TLS probe ({exc}); its last log lines:\n"
                + last_lines(self.files.log)
            ) from None
        disconnect(client)

    def _start_services(self) -> None:
        self.files.services_ready.unlink(missing_ok=True)
        log_start = log_size(self.files.services_log)
        command = [
            sys.executable,
            "-m",
            "broker.services",
            "--dir",
            str(self.config.pki_dir),
            "--port",
            str(self.config.port),
            "--bind",
            self.config.bind_address,
        ]
        if self.config_file is not None:
            command += ["--config", str(self.config_file)]
        with open(self.files.services_log, "ab") as log:
            self.services = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
                preexec_fn=children.preexec(signal.SIGTERM),  # and it ends with us
            )
        # The parent-death signal asks it to stop; the guard makes sure it has, even when a
        # stop hangs on a broker that died with us (seen once under a loaded full suite).
        self._disarm_services_guard()
        self._services_guard = children.Guard(self.services.pid, "broker.services")
        deadline = time.monotonic() + SERVICES_READY_TIMEOUT
        while not self.files.services_ready.exists():
            if self.services.poll() is not None:
                raise BrokerError(
                    "the fleet services exited during start-up; their log lines:\n"
                    + last_lines(self.files.services_log, start=log_start)
                )
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the fleet services were not ready within {SERVICES_READY_TIMEOUT:.0f} s; "
                    "their log lines:\n" + last_lines(self.files.services_log, start=log_start)
                )
            time.sleep(0.05)

    # ---------------------------------------------------------------- running

    def request_stop(self) -> None:
        self._stopping.set()

    def supervise(self) -> int:
        """Run until request_stop(); 0 on a requested stop, 1 if the broker died."""
        restarts: list[float] = []
        total_restarts = 0
        while not self._stopping.wait(0.5):
            if not self.broker.alive():
                self._report(
                    "Mosquitto exited unexpectedly; its last log lines:\n"
                    + last_lines(self.files.log)
                )
                self.stop()
                return 1
            if self.services is not None and self.services.poll() is not None:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > MAX_SERVICE_RESTARTS:
                    self._report(
                        "the fleet services keep crashing; their last log lines:\n"
                        + last_lines(self.files.services_log)
                    )
                    self.stop()
                    return 1
                self._report("the fleet services exited; restarting them")
                try:
                    self._start_services()
                except BrokerError as exc:
                    self._report(str(exc))
                total_restarts += 1
                self._write_state(restarts=total_restarts)
        self.stop()
        return 0

    def _report(self, message: str) -> None:
        print(f"fleet-broker: {message}", file=sys.stderr, flush=True)

    def _disarm_services_guard(self) -> None:
        if self._services_guard is not None:
            self._services_guard.disarm()
            self._services_guard = None

    def stop(self) -> None:
        if self.services is not None and self.services.poll() is None:
            self.services.send_signal(signal.SIGTERM)
            try:
                self.services.wait(10)
            except subprocess.TimeoutExpired:
                self.services.kill()
                self.services.wait()
        self._disarm_services_guard()
        self.broker.stop()
        if self._broker_guard is not None:
            self._broker_guard.disarm()
            self._broker_guard = None
        self.files.services_ready.unlink(missing_ok=True)
        running = RunningState.read(self.files)
        if running and running.supervisor_pid == os.getpid():
            self.files.state.unlink(missing_ok=True)
