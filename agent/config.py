"""``agent.toml``: where the broker is, the claim credentials, how to provision, where state lives.

Validation reports every problem at once, one line each, naming the key and the fix: unknown
keys, wrong types, missing or unreadable files. ``--set section.key=value`` overrides a value
(dotted keys; ``--set provisioning.parameters.SerialNumber=SN-1`` sets one parameter), parsed
by the type that key expects. Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agent import wire
from agent.control import SOCKET_NAME
from agent.handlers import UNHANDLED_POLICIES, Unhandled
from agent.keystore import DEFAULT_STATE_DIR, KEY_TYPES, KeyType, key_mode_problem
from agent.provisioning import DEFAULT_COMMON_NAME, DEFAULT_TEMPLATE
from agent.renewal import RenewalPolicy
from agent.session import SessionError, load_identity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG: Final = Path("/etc/fleet-agent/agent.toml")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH: Final = 107


class ConfigError(Exception):
    """Every problem found, one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class BrokerSection:
    endpoint: str
    port: int
    ca_file: Path


@dataclass(frozen=True)
class ClaimSection:
    certificate: Path
    key: Path
    remove_after_provisioning: bool = False


@dataclass(frozen=True)
class ProvisioningSection:
    template: str = DEFAULT_TEMPLATE
    parameters: Mapping[str, str] = field(default_factory=dict)
    key_type: KeyType = "ec-p256"
    common_name: str = DEFAULT_COMMON_NAME
    timeout: float = 10.0
    max_attempts: int = 5


@dataclass(frozen=True)
class AgentSection:
    state_dir: Path = DEFAULT_STATE_DIR
    log_level: str = "info"  # a daemon says when it connects; debug for the wire
    keepalive: int = 60  # seconds; a dead link is noticed after 1.5 times this
    control_socket: Path | None = None  # None: <state_dir>/agent.sock

    @property
    def socket_path(self) -> Path:
        """Where the running agent's control socket lives (``control_socket`` or
        ``<state_dir>/agent.sock``)."""
        return self.control_socket or self.state_dir / SOCKET_NAME


@dataclass(frozen=True)
class ShadowSection:
    classic: bool = True
    names: tuple[str, ...] = ()
    report_interval: float = 300.0
    facts_key: str = "device"
    unhandled: Unhandled = "ignore"
    command: Path | None = None
    command_keys: tuple[str, ...] = ()
    command_timeout: float = 30.0
    plugins: tuple[str, ...] = ()
    queue_max_bytes: int = 64 * 1024  # reports waiting on disk, per shadow

    @property
    def shadows(self) -> tuple[str | None, ...]:
        """Every shadow to sync: None is the classic shadow."""
        return ((None,) if self.classic else ()) + self.names


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    broker: BrokerSection
    claim: ClaimSection
    provisioning: ProvisioningSection
    agent: AgentSection
    shadow: ShadowSection = field(default_factory=ShadowSection)
    renewal: RenewalPolicy = field(default_factory=RenewalPolicy)


# section -> key -> (kind, required, default). Kinds: str, int, float, bool, path, table.
_Spec = tuple[str, bool, Any]
SCHEMA: Final[dict[str, dict[str, _Spec]]] = {
    "broker": {
        "endpoint": ("str", True, None),
        "port": ("int", False, 8883),
        "ca_file": ("path", True, None),
    },
    "claim": {
        "certificate": ("path", True, None),
        "key": ("path", True, None),
        "remove_after_provisioning": ("bool", False, False),
    },
    "provisioning": {
        "template": ("str", False, DEFAULT_TEMPLATE),
        "parameters": ("table", False, {}),
        "key_type": ("str", False, "ec-p256"),
        "common_name": ("str", False, DEFAULT_COMMON_NAME),
        "timeout": ("float", False, 10.0),
        "max_attempts": ("int", False, 5),
    },
    "agent": {
        "state_dir": ("path", False, str(DEFAULT_STATE_DIR)),
        "log_level": ("str", False, "info"),
        "keepalive": ("int", False, 60),
        "control_socket": ("path", False, ""),
    },
    "shadow": {
        "classic": ("bool", False, True),
        "names": ("list", False, []),
        "report_interval": ("float", False, 300.0),
        "facts_key": ("str", False, "device"),
        "unhandled": ("str", False, "ignore"),
        "command": ("path", False, ""),
        "command_keys": ("list", False, []),
        "command_timeout": ("float", False, 30.0),
        "plugins": ("list", False, []),
        "queue_max_bytes": ("int", False, 64 * 1024),
    },
    "renewal": {
        "enabled": ("bool", False, True),
        "share": ("float", False, 0.8),
        "min_age": ("float", False, 30.0),
        "retry_base": ("float", False, 60.0),
        "retry_cap": ("float", False, 3600.0),
    },
}
_KIND_NAMES: Final = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "path": "a path (string)",
    "table": "a table of strings",
    "list": "a list of strings",
}


def _type_ok(kind: str, value: object) -> bool:
    if kind in ("str", "path"):
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, dict)


def _parse_override(kind: str, raw: str) -> object:
    if kind == "int":
        return int(raw, 10)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ValueError(raw)
    if kind == "list":
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def apply_overrides(document: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Apply ``section.key=value`` overrides in place; return the problems found."""
    problems = []
    for item in overrides:
        name, sep, raw = item.partition("=")
        name = name.strip()
        parts = name.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            problems.append(f"--set {item}: expected section.key=value, e.g. broker.port=8883")
            continue
        section, key = parts[0], parts[1]
        if section not in SCHEMA:
            problems.append(f"--set {item}: unknown section [{section}] ({_known(SCHEMA)})")
            continue
        if key not in SCHEMA[section]:
            problems.append(
                f"--set {item}: unknown key {section}.{key} ({_known(SCHEMA[section])})"
            )
            continue
        kind = SCHEMA[section][key][0]
        target = document.setdefault(section, {})
        if not isinstance(target, dict):
            problems.append(f"--set {item}: [{section}] in the file is not a table")
            continue
        if kind == "table":
            if len(parts) != 3:
                problems.append(f"--set {item}: use {section}.{key}.<Name>=<value>")
                continue
            table = target.setdefault(key, {})
            if isinstance(table, dict):
                table[parts[2]] = raw
            continue
        if len(parts) != 2:
            problems.append(f"--set {item}: {section}.{key} has no sub-keys")
            continue
        try:
            target[key] = _parse_override(kind, raw)
        except ValueError:
            problems.append(f"--set {item}: {section}.{key} must be {_KIND_NAMES[kind]}")
    return problems


def _known(keys: Mapping[str, object]) -> str:
    return "known: " + ", ".join(keys)


def _check_readable(label: str, path: Path, problems: list[str], *, what: str) -> None:
    if not path.exists():
        problems.append(f"{label}: {what} {path} does not exist")
    elif not path.is_file():
        problems.append(f"{label}: {path} is not a file")
    elif not os.access(path, os.R_OK):
        problems.append(f"{label}: {what} {path} is not readable by this user (uid {os.geteuid()})")


def load_config(
    path: Path, overrides: Sequence[str] = (), *, check_claim_files: bool = True
) -> AgentConfig:
    """Read, override and validate; raise ConfigError listing every problem.

    ``check_claim_files=False`` skips checking the claim certificate and key files (a device
    already provisioned may have removed them).
    """
    path = Path(path)
    values, _, problems = _resolve(path, overrides)
    return _build(path, values, problems, check_claim_files=check_claim_files)


def effective_settings(
    path: Path, overrides: Sequence[str] = ()
) -> tuple[dict[str, dict[str, Any]], set[tuple[str, str]]]:
    """Every setting as the agent uses it, ``overrides`` applied, and which (section, key)
    pairs are defaults (not in the file or the overrides). Call ``load_config`` first: this
    does not validate."""
    values, given, _ = _resolve(Path(path), overrides)
    defaults = {(section, key) for section, spec in SCHEMA.items() for key in spec}
    return values, defaults - given


def _resolve(
    path: Path, overrides: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], set[tuple[str, str]], list[str]]:
    """The file read and overridden: each section's keys (defaults filled in), the keys
    given, and the problems of shape (unknown, missing, wrong type)."""
    try:
        document: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            [f"{path}: no such config file (copy agent/agent.example.toml and edit it)"]
        ) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None

    problems = apply_overrides(document, overrides)
    values: dict[str, dict[str, Any]] = {}
    given_keys: set[tuple[str, str]] = set()
    for section, value in document.items():
        if section not in SCHEMA:
            problems.append(f"{path}: unknown section [{section}] ({_known(SCHEMA)})")
        elif not isinstance(value, dict):
            problems.append(f"{path}: {section} must be a table ([{section}])")
    for section, spec in SCHEMA.items():
        given = document.get(section, {})
        if not isinstance(given, dict):
            given = {}
        for key in given:
            if key not in spec:
                problems.append(f"{path}: unknown key {section}.{key} ({_known(spec)})")
        resolved: dict[str, Any] = {}
        for key, (kind, required, default) in spec.items():
            if key not in given:
                if required:
                    problems.append(f"{path}: {section}.{key} is required")
                resolved[key] = default
                continue
            value = given[key]
            if not _type_ok(kind, value):
                problems.append(
                    f"{path}: {section}.{key} must be {_KIND_NAMES[kind]}, got {value!r}"
                )
                resolved[key] = default
                continue
            resolved[key] = value
            given_keys.add((section, key))
        values[section] = resolved
    return values, given_keys, problems


def _build(
    path: Path,
    values: dict[str, dict[str, Any]],
    problems: list[str],
    *,
    check_claim_files: bool,
) -> AgentConfig:
    """Check the values against each other and the file system; the config or ConfigError."""
    base = path.parent

    def as_path(value: object) -> Path | None:
        if not isinstance(value, str) or not value:
            return None
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else (base / candidate)

    b, c, p, a = values["broker"], values["claim"], values["provisioning"], values["agent"]
    if isinstance(b["endpoint"], str) and not b["endpoint"].strip():
        problems.append(f"{path}: broker.endpoint is empty; give the broker's host name")
    if isinstance(b["port"], int) and not 1 <= b["port"] <= 65535:
        problems.append(f"{path}: broker.port must be 1-65535, got {b['port']}")
    template = p["template"]
    if isinstance(template, str) and not wire.TEMPLATE_NAME_PATTERN.fullmatch(template):
        problems.append(
            f"{path}: provisioning.template {template!r} is invalid: 1-36 characters from "
            "A-Z a-z 0-9 _ -"
        )
    parameters = p["parameters"] if isinstance(p["parameters"], dict) else {}
    for name, value in parameters.items():
        if not isinstance(value, str):
            problems.append(
                f"{path}: provisioning.parameters.{name} must be a string, got {value!r} "
                f'(quote it: {name} = "{value}")'
            )
    if p["key_type"] not in KEY_TYPES:
        problems.append(
            f"{path}: provisioning.key_type {p['key_type']!r} is unknown; use one of "
            + ", ".join(KEY_TYPES)
        )
    if isinstance(p["timeout"], int | float) and not 0 < p["timeout"] <= 600:
        problems.append(f"{path}: provisioning.timeout must be between 0 and 600 seconds")
    if isinstance(p["max_attempts"], int) and not 1 <= p["max_attempts"] <= 100:
        problems.append(f"{path}: provisioning.max_attempts must be between 1 and 100")
    if a["log_level"] not in LOG_LEVELS:
        problems.append(
            f"{path}: agent.log_level {a['log_level']!r} is unknown; use one of "
            + ", ".join(LOG_LEVELS)
        )

    if isinstance(a["keepalive"], int) and not 5 <= a["keepalive"] <= 1200:
        problems.append(f"{path}: agent.keepalive must be between 5 and 1200 seconds")
    control_socket = _control_socket(path, a["control_socket"], problems)
    sh = values["shadow"]
    names = sh["names"] if isinstance(sh["names"], list) else []
    for name in names:
        if not wire.SHADOW_NAME_PATTERN.fullmatch(name):
            problems.append(
                f"{path}: shadow.names: {name!r} is not a shadow name (1-64 characters from "
                "A-Z a-z 0-9 : _ -)"
            )
    if len(set(names)) != len(names):
        problems.append(f"{path}: shadow.names lists a shadow twice")
    if sh["classic"] is False and not names:
        problems.append(f"{path}: shadow.classic is false and shadow.names is empty: no shadow")
    if isinstance(sh["report_interval"], int | float) and not 5 <= sh["report_interval"] <= 86400:
        problems.append(f"{path}: shadow.report_interval must be between 5 and 86400 seconds")
    if sh["unhandled"] not in UNHANDLED_POLICIES:
        problems.append(
            f"{path}: shadow.unhandled {sh['unhandled']!r} is unknown; use one of "
            + ", ".join(UNHANDLED_POLICIES)
        )
    if isinstance(sh["command_timeout"], int | float) and not 0 < sh["command_timeout"] <= 3600:
        problems.append(f"{path}: shadow.command_timeout must be between 0 and 3600 seconds")
    if isinstance(sh["queue_max_bytes"], int) and not 1024 <= sh["queue_max_bytes"] <= 64 << 20:
        problems.append(f"{path}: shadow.queue_max_bytes must be between 1024 and 67108864")
    command = as_path(sh["command"])
    if command is not None:
        if not command.is_file():
            problems.append(f"{path}: shadow.command {command} does not exist")
        elif not os.access(command, os.X_OK):
            problems.append(
                f"{path}: shadow.command {command} is not executable; run: chmod +x {command}"
            )

    r = values["renewal"]
    if isinstance(r["share"], int | float) and not 0.05 <= r["share"] <= 0.99:
        problems.append(
            f"{path}: renewal.share must be between 0.05 and 0.99 (of the certificate's "
            f"validity), got {r['share']}"
        )
    if isinstance(r["min_age"], int | float) and not 1 <= r["min_age"] <= 86400:
        problems.append(
            f"{path}: renewal.min_age must be between 1 and 86400 seconds (a certificate is "
            "never renewed younger than that)"
        )
    if isinstance(r["retry_base"], int | float) and not 1 <= r["retry_base"] <= 86400:
        problems.append(f"{path}: renewal.retry_base must be between 1 and 86400 seconds")
    if (
        isinstance(r["retry_cap"], int | float)
        and isinstance(r["retry_base"], int | float)
        and not r["retry_base"] <= r["retry_cap"] <= 7 * 86400
    ):
        problems.append(
            f"{path}: renewal.retry_cap must be between renewal.retry_base and 604800 seconds"
        )

    ca_file, claim_cert, claim_key = (
        as_path(b["ca_file"]),
        as_path(c["certificate"]),
        as_path(c["key"]),
    )
    if ca_file is not None:
        _check_readable(f"{path}: broker.ca_file", ca_file, problems, what="CA file")
    if check_claim_files and claim_cert is not None and claim_key is not None:
        problems += claim_file_problems(path, claim_cert, claim_key)
    state_dir = as_path(a["state_dir"]) or DEFAULT_STATE_DIR

    if problems:
        raise ConfigError(problems)
    assert ca_file is not None and claim_cert is not None and claim_key is not None
    return AgentConfig(
        path=path,
        broker=BrokerSection(b["endpoint"].strip(), b["port"], ca_file),
        claim=ClaimSection(claim_cert, claim_key, c["remove_after_provisioning"]),
        provisioning=ProvisioningSection(
            template=template,
            parameters=dict(parameters),
            key_type=p["key_type"],
            common_name=p["common_name"],
            timeout=float(p["timeout"]),
            max_attempts=p["max_attempts"],
        ),
        agent=AgentSection(
            state_dir=state_dir,
            log_level=a["log_level"],
            keepalive=a["keepalive"],
            control_socket=control_socket,
        ),
        shadow=ShadowSection(
            classic=sh["classic"],
            names=tuple(names),
            report_interval=float(sh["report_interval"]),
            facts_key=sh["facts_key"],
            unhandled=sh["unhandled"],
            command=command,
            command_keys=tuple(sh["command_keys"]),
            command_timeout=float(sh["command_timeout"]),
            plugins=tuple(sh["plugins"]),
            queue_max_bytes=sh["queue_max_bytes"],
        ),
        renewal=RenewalPolicy(
            enabled=r["enabled"],
            share=float(r["share"]),
            min_age=float(r["min_age"]),
            retry_base=float(r["retry_base"]),
            retry_cap=float(r["retry_cap"]),
        ),
    )


def _control_socket(path: Path, value: object, problems: list[str]) -> Path | None:
    """``agent.control_socket`` checked: absolute, short enough for a Unix socket, not
    something else already, in a folder that exists or can be made (the agent creates a
    missing one, 0700, at run). None: not set."""
    if not isinstance(value, str) or not value:
        return None
    label = f"{path}: agent.control_socket"
    socket_path = Path(value).expanduser()
    if not socket_path.is_absolute():
        problems.append(
            f"{label} must be an absolute path, got {value!r} (e.g. /run/fleet-agent/agent.sock)"
        )
        return None
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        problems.append(
            f"{label} {socket_path} is too long for a Unix socket (at most "
            f"{MAX_SOCKET_PATH} bytes); pick a shorter path"
        )
    try:
        if socket_path.is_dir():
            problems.append(f"{label} {socket_path} is a folder; name the socket file in it")
        elif socket_path.exists() and not socket_path.is_socket():
            problems.append(
                f"{label} {socket_path} exists and is not a socket (the agent would replace "
                "it); pick another path"
            )
        folder = socket_path.parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            problems.append(
                f"{label}: {existing} is not a folder, so {folder} cannot be created there"
            )
    except OSError:
        pass  # not ours to look into (another user's folder): the agent's own run tells
    return socket_path


def claim_file_problems(path: Path, certificate: Path, key: Path) -> list[str]:
    """Problems with the claim certificate and key files (none if both are readable and the
    key is private: a claim key group or others may read is refused like the device key)."""
    problems: list[str] = []
    _check_readable(f"{path}: claim.certificate", certificate, problems, what="claim certificate")
    label = f"{path}: claim.key"
    before = len(problems)
    _check_readable(label, key, problems, what="claim key")
    if len(problems) == before:
        try:
            mode = key.stat().st_mode
        except OSError as exc:
            problems.append(f"{label}: cannot read the claim key {key}: {exc.strerror}")
        else:
            problem = key_mode_problem(key, mode, what="claim key")
            if problem is not None:
                problems.append(f"{label}: {problem}")
    if not problems:
        try:  # the same load as the claim connection's: a pair that does not match, now
            load_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), certificate, key)
        except SessionError as exc:
            problems.append(f"{label}: {exc}")
    return problems
