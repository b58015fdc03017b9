"""A fleet scenario: who arrives, how fast, what they do, for how long.

Given on the command line or in a TOML file (``fleet-sim run scenario.toml``; options on the
command line override the file). Every problem is reported at once, one line each.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Ramp = Literal["constant", "linear"]
ClaimMode = Literal["shared", "per-device"]


class ScenarioError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Scenario:
    devices: int = 100
    rate: float = 50.0  # devices arriving per second (the peak, with a linear ramp)
    ramp: Ramp = "constant"
    ramp_seconds: float = 0.0
    concurrency: int = 1000  # onboardings in flight at once, whole fleet
    processes: int = 0  # 0: enough for devices_per_process, at most one per core
    devices_per_process: int = 5000
    update_interval: float = 30.0  # seconds between shadow updates of one device; 0: none
    update_bytes: int = 64
    hold: float = 10.0  # seconds to stay connected after the last arrival
    churn: float = 0.0  # drops + reconnects per second, whole fleet
    storm_at: float | None = None  # seconds into the hold: every device drops and comes back
    claim: ClaimMode = "shared"
    desired_rate: float = 0.0  # operator desired-state changes per second, whole fleet
    endpoint: str | None = None  # None: start the local broker side for this run
    port: int = 8883
    ca_file: Path | None = None
    claim_certificate: Path | None = None
    claim_key: Path | None = None
    template: str = "fleet-default"
    serial_prefix: str = "SIM"
    timeout: float = 30.0
    # Seconds of bare mutual-TLS connects before the fleet arrives: the ceiling the onboarding
    # rate is reported against. 0: not measured.
    ceiling_seconds: float = 0.0

    @property
    def worker_count(self) -> int:
        """Processes to run: as given, else enough for devices_per_process and, for fleets of
        over a thousand, every core (the broker side shares them, but TLS is the cost)."""
        if self.processes:
            return self.processes
        cores = os.cpu_count() or 1
        return max(
            math.ceil(self.devices / self.devices_per_process),
            min(cores, math.ceil(self.devices / 1000)),
        )

    def arrival_offset(self, index: int) -> float:
        """Seconds after the start at which device ``index`` (0-based) arrives."""
        if self.ramp == "linear" and self.ramp_seconds > 0:
            # Rate grows linearly from 0 to `rate` over ramp_seconds: n(t) = rate t^2 / (2 T).
            ramped = self.rate * self.ramp_seconds / 2
            if index < ramped:
                return math.sqrt(2 * self.ramp_seconds * index / self.rate)
            return self.ramp_seconds + (index - ramped) / self.rate
        return index / self.rate


_FIELDS = {f.name: f for f in dataclasses.fields(Scenario)}
_PATHS = {"ca_file", "claim_certificate", "claim_key"}


def _coerce(name: str, value: Any, problems: list[str]) -> Any:
    kind = str(_FIELDS[name].type)
    try:
        if name in _PATHS:
            return None if value in (None, "") else Path(str(value)).expanduser()
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return None if value is None else float(value)
        return value if value is None else str(value)
    except (TypeError, ValueError):
        problems.append(f"{name}: {value!r} is not a valid {kind.split(' ')[0]}")
        return _FIELDS[name].default


def build(file: Path | None, overrides: Mapping[str, Any]) -> Scenario:
    """The scenario from ``file`` (if any) with ``overrides`` (None values ignored)."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    if file is not None:
        try:
            document = tomllib.loads(Path(file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ScenarioError([f"{file}: no such scenario file"]) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ScenarioError([f"{file}: cannot read it as TOML: {exc}"]) from None
        table = document.get("scenario", document)
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                problems.append(f"{file}: unknown key {key!r} (known: {', '.join(_FIELDS)})")
            else:
                values[name] = value
        base = Path(file).resolve().parent
        for name in _PATHS & values.keys():
            if values[name] and not Path(values[name]).expanduser().is_absolute():
                values[name] = str(base / values[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    coerced = {name: _coerce(name, value, problems) for name, value in values.items()}
    scenario = Scenario(**coerced)
    problems += validate(scenario)
    if problems:
        raise ScenarioError(problems)
    return scenario


def validate(s: Scenario) -> list[str]:
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(1 <= s.devices <= 200_000, "devices must be between 1 and 200000")
    need(0 < s.rate <= 100_000, "rate must be above 0 (devices per second)")
    need(s.ramp in ("constant", "linear"), "ramp must be constant or linear")
    need(s.ramp_seconds >= 0, "ramp_seconds must be 0 or more")
    need(1 <= s.concurrency <= 100_000, "concurrency must be between 1 and 100000")
    need(0 <= s.processes <= 256, "processes must be between 0 (automatic) and 256")
    need(1 <= s.devices_per_process <= 100_000, "devices_per_process must be 1 to 100000")
    need(s.update_interval == 0 or s.update_interval >= 0.1, "update_interval: 0 or >= 0.1 s")
    need(0 <= s.update_bytes <= 7000, "update_bytes must be 0-7000 (shadows hold 8 KB)")
    need(s.hold >= 0, "hold must be 0 or more seconds")
    need(s.churn >= 0, "churn must be 0 or more reconnects per second")
    need(s.storm_at is None or 0 <= s.storm_at <= s.hold, "storm_at must lie within the hold")
    need(s.claim in ("shared", "per-device"), "claim must be shared or per-device")
    need(s.desired_rate >= 0, "desired_rate must be 0 or more per second")
    need(1 <= s.port <= 65535, "port must be 1-65535")
    need(0 < s.timeout <= 600, "timeout must be between 0 and 600 seconds")
    need(0 <= s.ceiling_seconds <= 300, "ceiling_seconds must be between 0 and 300")
    if s.endpoint is not None:
        for name in ("ca_file", "claim_certificate", "claim_key"):
            path = getattr(s, name)
            need(path is not None, f"{name} is required with endpoint")
            need(path is None or path.is_file(), f"{name}: {path} does not exist")
        need(s.claim == "shared", "claim = per-device needs the local broker (no endpoint)")
    return problems
