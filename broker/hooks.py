"""Pre-provisioning hooks: decide, before RegisterThing creates anything, whether a device may
provision and with which parameter overrides (AWS's pre-provisioning hook, locally).

Configured per template by ``<templates>/<name>.hook.json``, one of:
    {"allowSerials": ["SN-1", "SN-2"], "parameter": "SerialNumber"}
    {"command": ["/usr/local/bin/check-device", "--strict"], "timeoutSeconds": 5}
A command gets AWS's hook input JSON on stdin and must print
``{"allowProvisioning": true|false, "parameterOverrides": {...}}`` within the timeout.
Any error, timeout or malformed answer denies.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from broker.rejection import access_denied

HOOK_TIMEOUT_SECONDS = 5.0


class HookConfigError(Exception):
    """A hook file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class HookInput:
    """AWS's pre-provisioning hook input (payloadVersion 2020-04-01)."""

    claim_certificate_id: str | None
    certificate_id: str
    certificate_pem: str
    template_arn: str
    client_id: str
    parameters: Mapping[str, str]

    def document(self) -> dict[str, object]:
        return {
            "claimCertificateId": self.claim_certificate_id,
            "certificateId": self.certificate_id,
            "certificatePem": self.certificate_pem,
            "templateArn": self.template_arn,
            "clientId": self.client_id,
            "parameters": dict(self.parameters),
        }


@dataclass(frozen=True)
class AllowList:
    serials: frozenset[str]
    parameter: str = "SerialNumber"

    def decide(self, hook_input: HookInput) -> dict[str, str]:
        serial = hook_input.parameters.get(self.parameter)
        if serial is None or serial not in self.serials:
            raise access_denied(f"{self.parameter} is not on the template's allow-list")
        return {}


@dataclass(frozen=True)
class CommandHook:
    command: Sequence[str]
    timeout: float = HOOK_TIMEOUT_SECONDS
    name: str = field(default="hook")

    def decide(self, hook_input: HookInput) -> dict[str, str]:
        try:
            done = subprocess.run(
                list(self.command),
                input=json.dumps(hook_input.document()).encode(),
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            message = f"pre-provisioning hook timed out after {self.timeout:g} s"
            raise access_denied(message) from None
        except OSError as exc:
            raise access_denied(f"pre-provisioning hook could not run: {exc.strerror}") from None
        if done.returncode != 0:
            raise access_denied(f"pre-provisioning hook failed (exit code {done.returncode})")
        try:
            answer = json.loads(done.stdout)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise access_denied("pre-provisioning hook printed no JSON answer") from None
        if not isinstance(answer, dict) or answer.get("allowProvisioning") is not True:
            raise access_denied("pre-provisioning hook denied provisioning")
        overrides = answer.get("parameterOverrides") or {}
        if not isinstance(overrides, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in overrides.items()
        ):
            raise access_denied("pre-provisioning hook answered malformed parameterOverrides")
        return overrides


Hook = AllowList | CommandHook


def load_hook(path: Path) -> Hook:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HookConfigError(f"{path}: not a readable JSON hook config ({exc})") from None
    if not isinstance(config, dict):
        raise HookConfigError(f"{path}: must be a JSON object")
    if "allowSerials" in config:
        serials = config["allowSerials"]
        if not isinstance(serials, list) or not all(isinstance(s, str) for s in serials):
            raise HookConfigError(f"{path}: allowSerials must be a list of strings")
        return AllowList(frozenset(serials), str(config.get("parameter", "SerialNumber")))
    if "command" in config:
        command = config["command"]
        if isinstance(command, str):
            command = [command]
        if not command or not all(isinstance(c, str) for c in command):
            raise HookConfigError(f"{path}: command must be a string or a list of strings")
        timeout = config.get("timeoutSeconds", HOOK_TIMEOUT_SECONDS)
        if not isinstance(timeout, int | float) or not 0 < timeout <= HOOK_TIMEOUT_SECONDS:
            raise HookConfigError(f"{path}: timeoutSeconds must be in (0, 5] (AWS allows 5 s)")
        return CommandHook(tuple(command), float(timeout), path.stem)
    raise HookConfigError(f"{path}: needs either allowSerials or command")


def load_hooks(folder: Path, template_names: Sequence[str]) -> dict[str, Hook]:
    hooks = {}
    for name in template_names:
        path = folder / f"{name}.hook.json"
        if path.exists():
            hooks[name] = load_hook(path)
    return hooks
