"""Broker-side configuration: ``<pki dir>/broker.toml``, one clear message per problem."""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from agent import wire

LOG_LEVELS = ("error", "warning", "notice", "info", "debug")


class ConfigError(Exception):
    """A configuration problem; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class BrokerConfig:
    pki_dir: Path
    port: int = 8883
    bind_address: str = "0.0.0.0"
    log_level: str = "notice"
    max_open_files: int = 65536
    run_dir: Path = field(default=Path("run"))
    device_validity_days: int = 365
    device_validity_seconds: int = 0  # if set, instead of days: short-lived, to try renewal
    services_client_id: str = "fleet-services"
    templates_dir: Path = field(default=Path("templates"))
    allow_create_keys: bool = False
    token_lifetime_seconds: int = 3600
    min_renewal_interval_seconds: int = 60  # a device's renewals at most this often (see below)
    # Per-connection request quota the plugin enforces (AWS: 100 publishes/s per connection).
    requests_per_second: float = 100.0
    request_burst: int = 100
    flood_disconnect: int = 1000  # requests over quota in a row before a disconnect; 0: never

    @property
    def device_validity(self) -> dt.timedelta:
        if self.device_validity_seconds:
            return dt.timedelta(seconds=self.device_validity_seconds)
        return dt.timedelta(days=self.device_validity_days)

    @property
    def connect_host(self) -> str:
        """Where a local client reaches this broker."""
        return "127.0.0.1" if self.bind_address in ("0.0.0.0", "::", "") else self.bind_address


# section -> key -> (attribute, type)
_SCHEMA: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    "broker": {
        "port": ("port", int),
        "bind_address": ("bind_address", str),
        "log_level": ("log_level", str),
        "max_open_files": ("max_open_files", int),
        "run_dir": ("run_dir", str),
    },
    "certificates": {
        "device_validity_days": ("device_validity_days", int),
        "device_validity_seconds": ("device_validity_seconds", int),
        "min_renewal_interval_seconds": ("min_renewal_interval_seconds", int),
    },
    "services": {"client_id": ("services_client_id", str)},
    "provisioning": {
        "templates_dir": ("templates_dir", str),
        "allow_create_keys_and_certificate": ("allow_create_keys", bool),
        "ownership_token_lifetime_seconds": ("token_lifetime_seconds", int),
    },
    "limits": {
        "requests_per_second": ("requests_per_second", (int, float)),
        "request_burst": ("request_burst", int),
        "flood_disconnect": ("flood_disconnect", int),
    },
}


def load_config(pki_dir: Path, config_file: Path | None = None, **overrides: Any) -> BrokerConfig:
    """Read ``broker.toml`` (default: in ``pki_dir``), apply overrides, validate."""
    pki_dir = pki_dir.resolve()
    path = config_file or pki_dir / "broker.toml"
    values: dict[str, Any] = {}
    if path.exists():
        try:
            document = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{path}: not valid TOML ({exc}); fix the file or delete it"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        values = _flatten(path, document)
    elif config_file is not None:
        raise ConfigError(f"{path}: no such config file")
    given = {k: v for k, v in overrides.items() if v is not None}
    port = given.get("port")
    if port is not None and not (isinstance(port, int) and 1 <= port <= 65535):
        # A command-line value: say so, not the file.
        raise ConfigError(f"--port {port} is not a TCP port: give 1-65535")
    values.update(given)
    run_dir = Path(values.pop("run_dir", "run"))
    templates_dir = Path(values.pop("templates_dir", "templates"))
    config = BrokerConfig(pki_dir=pki_dir, **values)
    config = replace(
        config,
        run_dir=run_dir if run_dir.is_absolute() else pki_dir / run_dir,
        templates_dir=templates_dir if templates_dir.is_absolute() else pki_dir / templates_dir,
    )
    _validate(path, config)
    return config


def _flatten(path: Path, document: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for section, table in document.items():
        schema = _SCHEMA.get(section)
        if schema is None or not isinstance(table, dict):
            known = ", ".join(f"[{s}]" for s in _SCHEMA)
            raise ConfigError(f"{path}: unknown section [{section}]; known sections: {known}")
        for key, value in table.items():
            if key not in schema:
                known = ", ".join(schema)
                raise ConfigError(f"{path}: unknown key {section}.{key}; known keys: {known}")
            attribute, expected = schema[key]
            bool_for_int = expected is not bool and isinstance(value, bool)
            if not isinstance(value, expected) or bool_for_int:
                kind = "number" if isinstance(expected, tuple) else expected.__name__
                article = "an" if kind[0] in "aeiou" else "a"
                raise ConfigError(
                    f"{path}: {section}.{key} must be {article} {kind}, got {value!r}"
                )
            values[attribute] = value
    return values


def _validate(path: Path, config: BrokerConfig) -> None:
    if not 1 <= config.port <= 65535:
        raise ConfigError(f"{path}: broker.port {config.port} is not a TCP port (1-65535)")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"{path}: broker.log_level {config.log_level!r} must be one of {', '.join(LOG_LEVELS)}"
        )
    if config.max_open_files < 1024:
        raise ConfigError(f"{path}: broker.max_open_files must be at least 1024")
    if not 1 <= config.device_validity_days <= 3650:
        raise ConfigError(f"{path}: certificates.device_validity_days must be 1-3650")
    if config.device_validity_seconds and not 60 <= config.device_validity_seconds <= 86400:
        raise ConfigError(
            f"{path}: certificates.device_validity_seconds must be 60-86400 (or 0 to use "
            "device_validity_days)"
        )
    if not 0 <= config.min_renewal_interval_seconds <= 86400:
        raise ConfigError(
            f"{path}: certificates.min_renewal_interval_seconds must be 0-86400 (0: no limit)"
        )
    if not 60 <= config.token_lifetime_seconds <= 7 * 24 * 3600:
        raise ConfigError(
            f"{path}: provisioning.ownership_token_lifetime_seconds must be 60-604800"
        )
    if config.requests_per_second < 0 or config.request_burst < 1 or config.flood_disconnect < 0:
        raise ConfigError(
            f"{path}: limits.requests_per_second must be >= 0 (0: no quota), "
            "limits.request_burst >= 1 and limits.flood_disconnect >= 0 (0: never)"
        )
    if wire.THING_NAME_PATTERN.fullmatch(config.services_client_id) is None:
        raise ConfigError(
            f"{path}: services.client_id must be 1-128 characters of letters, digits, ':', '_', '-'"
        )
