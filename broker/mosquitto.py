"""Render mosquitto.conf and the plugin policy into a run folder; start and stop the broker."""

from __future__ import annotations

import errno
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent import wire
from agent.durable import write_atomic
from broker import policy
from broker.config import BrokerConfig
from broker.pki import PkiPaths

PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
PLUGIN_LIBRARY = PLUGIN_DIR / "fleet_plugin.so"
APT_PACKAGES = "mosquitto mosquitto-dev libmosquitto-dev libssl-dev libsqlite3-dev build-essential"

# Mosquitto log types per configured level, most severe first.
_LOG_TYPES = {
    "error": ["error"],
    "warning": ["error", "warning"],
    "notice": ["error", "warning", "notice"],
    "info": ["error", "warning", "notice", "information"],
    "debug": ["error", "warning", "notice", "information", "debug"],
}


class BrokerError(Exception):
    """The broker cannot be started or reached; the message says why and what to do."""


@dataclass(frozen=True)
class RunFiles:
    dir: Path

    @property
    def conf(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def policy(self) -> Path:
        return self.dir / "policy.acl"

    @property
    def fallback_acl(self) -> Path:
        return self.dir / "deny-all.acl"

    @property
    def plugin(self) -> Path:
        """The plugin Mosquitto loads: a copy of the built one, where its user can reach it
        wherever the project lives (a clone in a private folder, a venv under /root)."""
        return self.dir / "fleet_plugin.so"

    @property
    def log(self) -> Path:
        return self.dir / "mosquitto.log"

    @property
    def services_log(self) -> Path:
        return self.dir / "services.log"

    @property
    def services_ready(self) -> Path:
        return self.dir / "services.ready"

    @property
    def state(self) -> Path:
        return self.dir / "fleet-broker.json"


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        raise BrokerError(
            "Mosquitto is not installed: run scripts/setup "
            f"(or sudo apt-get install {APT_PACKAGES})"
        )
    return found


def plugin_library() -> Path:
    """The built plugin; built on the spot when the sources are newer and headers are there."""
    sources = [*PLUGIN_DIR.glob("*.c"), *PLUGIN_DIR.glob("*.h")]
    stale = bool(sources) and (
        not PLUGIN_LIBRARY.exists()
        or PLUGIN_LIBRARY.stat().st_mtime < max(source.stat().st_mtime for source in sources)
    )
    if stale and Path("/usr/include/mosquitto_broker.h").exists() and shutil.which("make"):
        subprocess.run(["make", "-s", "-C", str(PLUGIN_DIR)], check=False, capture_output=True)
    if not PLUGIN_LIBRARY.exists():
        raise BrokerError(
            "the mqtt-fleet broker plugin is not built: run scripts/setup "
            f"(it needs {APT_PACKAGES})"
        )
    return PLUGIN_LIBRARY


def broker_user() -> str | None:
    """The user Mosquitto drops to when started as root (None when not root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return "root"  # no such user: Mosquitto would refuse to start; stay root explicitly
    return "mosquitto"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for local stacks started on the fly)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror:
            raise BrokerError(
                f"bind_address {host} is not an address of this machine: set [broker] "
                "bind_address in broker.toml (or --bind) to one of its addresses, or 0.0.0.0"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise BrokerError(
                    f"bind_address {host} is not an address of this machine: set [broker] "
                    "bind_address in broker.toml (or --bind) to one of its addresses, or 0.0.0.0"
                ) from None
            raise BrokerError(
                f"port {port} on {host} is in use ({exc.strerror}): stop what listens there "
                "(fleet-broker down, or another broker) or pick another port with --port"
            ) from None


def render_conf(config: BrokerConfig, files: RunFiles, user: str | None) -> str:
    pki = PkiPaths(config.pki_dir)
    lines = [
        "# Rendered by fleet-broker from broker.toml at every start; edits here are overwritten.",
        "per_listener_settings false",  # true would silently disable acl_file and MOSQ_EVT_TICK
        "allow_anonymous false",
        f"plugin {files.plugin}",
        f"plugin_opt_registry {pki.registry}",
        f"plugin_opt_policy {files.policy}",
        f"plugin_opt_service_id {config.services_client_id}",
        f"plugin_opt_claim_prefix {wire.CLAIM_CLIENT_ID_PREFIX}",
        f"plugin_opt_request_rate {config.requests_per_second:g}",
        f"plugin_opt_request_burst {config.request_burst}",
        f"plugin_opt_flood_disconnect {config.flood_disconnect}",
        # Reached only if the plugin ever deferred a decision, which it never does: deny.
        f"acl_file {files.fallback_acl}",
        "persistence true",
        f"persistence_location {files.dir}/",
        "autosave_interval 60",
        "persistent_client_expiration 14d",
        "max_queued_messages 10000",
        "max_packet_size 140000",  # AWS IoT allows 128 KB payloads
        "sys_interval 5",
        # Request/response traffic: without it Nagle + delayed ACKs add ~40 ms per round trip.
        "set_tcp_nodelay true",
        "connection_messages true",
        "log_dest stderr",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        *(f"log_type {t}" for t in _LOG_TYPES[config.log_level]),
    ]
    if user is not None:
        lines.append(f"user {user}")
    lines += [
        "",
        f"listener {config.port} {config.bind_address}",
        f"cafile {pki.ca_cert}",
        f"certfile {pki.broker_cert}",
        f"keyfile {pki.broker_key}",
        f"crlfile {pki.crl}",
        "require_certificate true",
        "tls_version tlsv1.2",  # the minimum; TLS 1.3 is negotiated when the client offers it
    ]
    return "\n".join(lines) + "\n"


def untraversable(folder: Path, user: str) -> tuple[Path, int, str] | None:
    """The first folder on the way to ``folder`` (itself included) that ``user`` may not
    enter, with its mode and owner; None when the whole path is open to that user."""
    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid, *os.getgrouplist(user, entry.pw_gid)}
    folder = folder.resolve()
    for path in (*reversed(folder.parents), folder):
        try:
            info = path.stat()
        except OSError:
            return None  # not there yet: whoever creates it decides
        if info.st_uid == entry.pw_uid:
            bit = 0o100
        elif info.st_gid in groups:
            bit = 0o010
        else:
            bit = 0o001
        if not info.st_mode & bit:
            try:
                owner = pwd.getpwuid(info.st_uid).pw_name
            except KeyError:
                owner = str(info.st_uid)
            return path, info.st_mode & 0o7777, owner
    return None


def check_broker_can_reach(config: BrokerConfig) -> None:
    """Mosquitto started as root drops to its own user before it opens its key, the CRL and
    the registry: every folder on the way must let that user in. Say which one does not."""
    user = broker_user()
    if user in (None, "root"):
        return
    pki = PkiPaths(config.pki_dir)
    for needed in (pki.root, pki.registry.parent, config.run_dir):
        blocked = untraversable(needed, user)
        if blocked is not None:
            folder, mode, owner = blocked
            raise BrokerError(
                f"Mosquitto runs as user {user} and cannot reach {needed}: {folder} is mode "
                f"{mode:04o} (owner {owner}); run: chmod o+x {folder} (or use a folder {user} "
                "can traverse)"
            )


def prepare_run_dir(config: BrokerConfig) -> RunFiles:
    files = RunFiles(config.run_dir)
    user = broker_user()
    try:
        files.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(files.dir, 0o750)
    except OSError as exc:
        raise BrokerError(
            f"broker.run_dir {files.dir} cannot be made ({exc.strerror}): set [broker] run_dir "
            "in broker.toml to a folder this user can create"
        ) from None
    if user not in (None, "root"):
        entry = pwd.getpwnam(user)
        os.chown(files.dir, entry.pw_uid, entry.pw_gid)
    write_atomic(
        files.plugin, plugin_library().read_bytes(), 0o644
    )  # a running one keeps its inode
    files.conf.write_text(render_conf(config, files, user))
    files.policy.write_text(policy.render())
    files.fallback_acl.write_text("# mqtt-fleet: every decision is the plugin's; nothing here.\n")
    files.services_ready.unlink(missing_ok=True)
    return files


def _raise_open_file_limit(wanted: int) -> None:
    """Raise RLIMIT_NOFILE for the broker: Mosquitto never raises its own, and each client
    is one descriptor. Root may lift the hard limit too (when the sandbox allows it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return
        except (ValueError, OSError):
            pass  # not allowed: settle for the hard limit
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _listening(port: int) -> bool:
    """Whether some socket listens on ``port`` (TCP state 0A in /proc/net/tcp{,6})."""
    wanted = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                if any(wanted in row and row.split()[3] == "0A" for row in rows):
                    return True
        except OSError:
            continue
    return False


def last_lines(path: Path, count: int = 8, start: int = 0) -> str:
    """The last ``count`` lines of a log, from byte ``start`` on (where this start began:
    the log is appended to, and an earlier run's lines would hide this one's error)."""
    try:
        with path.open("rb") as log:
            log.seek(start)
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-count:])


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class MosquittoProcess:
    """One Mosquitto child process with the plugin, its log in the run folder."""

    def __init__(self, config: BrokerConfig, files: RunFiles) -> None:
        self.config = config
        self.files = files
        self.process: subprocess.Popen[bytes] | None = None
        self.log_start = 0  # where this start's lines begin in the (appended) log

    def start(self) -> None:
        binary = find_mosquitto()
        self.log_start = log_size(self.files.log)
        # The log is opened here, so the user Mosquitto drops to need not write the folder.
        with open(self.files.log, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "-c", str(self.files.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=lambda: _raise_open_file_limit(self.config.max_open_files),
                start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Block until the listener is open (per /proc), or explain why not.

        Not by connecting: a bare TCP probe makes the broker log a TLS error at every start.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BrokerError(
                    "Mosquitto exited during start-up; its log lines:\n"
                    + last_lines(self.files.log, start=self.log_start)
                )
            if _listening(self.config.port):
                return
            time.sleep(0.05)
        raise BrokerError(
            f"Mosquitto did not listen on port {self.config.port} within {timeout:.0f} s; "
            "its log lines:\n" + last_lines(self.files.log, start=self.log_start)
        )

    def reload(self) -> None:
        """SIGHUP: re-read the CRL and the plugin policy."""
        if self.alive():
            os.kill(self.pid, signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
