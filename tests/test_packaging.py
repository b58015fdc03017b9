"""packaging/fleet-agent.service: parses, is hardened, and agrees with the agent it runs.

The unit is read with a small parser that keeps repeated keys (systemd allows them, and
``configparser`` would keep only the last). Its ExecStart is parsed with the agent's own
argument parser, and its RestartPreventExitStatus= is checked against the exit codes in
agent.cli. Where systemd-analyze is installed, it verifies the unit and rates its exposure.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.cli import EXIT_FAILED, EXIT_REVOKED, EXIT_TRANSIENT, EXIT_USAGE, build_parser
from agent.keystore import DEFAULT_STATE_DIR

pytestmark = pytest.mark.commands

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging" / "fleet-agent.service"
SECTIONS = {"Unit", "Service", "Install"}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd.syntax(7), enough for one unit: [sections], key=value, # and ; comments,
    backslash continuations, repeated keys kept in order, an empty value resets the list."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            assert name not in unit, f"line {number}: section [{name}] twice"
            section = unit[name] = {}
            continue
        assert section is not None, f"line {number}: outside any section: {raw!r}"
        key, equals, value = line.partition("=")
        assert equals, f"line {number}: not key=value: {raw!r}"
        key, value = key.strip(), value.strip()
        assert key and " " not in key, f"line {number}: bad key {key!r}"
        if value:
            section.setdefault(key, []).append(value)
        else:
            section[key] = [""]  # an empty assignment resets (and is itself meaningful)
    assert not pending, "the file ends in a line continuation"
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


def one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values is not None, f"{key}= missing from [{section}]"
    assert len(values) == 1, f"{key}= set {len(values)} times"
    return values[0]


@pytest.mark.unit
def test_the_unit_parses_into_the_usual_sections(unit: Unit) -> None:
    assert set(unit) == SECTIONS
    assert one(unit, "WantedBy", "Install") == "multi-user.target"
    assert "network-online.target" in one(unit, "After", "Unit").split()
    assert "network-online.target" in one(unit, "Wants", "Unit").split()


HARDENING = {
    "Type": "notify",
    "NotifyAccess": "main",
    "Restart": "on-failure",
    "RestartSec": "5",
    "User": "fleet-agent",
    "Group": "fleet-agent",
    "StateDirectory": "fleet-agent",
    "StateDirectoryMode": "0700",
    "ConfigurationDirectory": "fleet-agent",
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
}


@pytest.mark.unit
@pytest.mark.parametrize(("key", "expected"), sorted(HARDENING.items()))
def test_hardening(unit: Unit, key: str, expected: str) -> None:
    assert one(unit, key) == expected


@pytest.mark.unit
def test_no_dynamic_user_and_no_capabilities(unit: Unit) -> None:
    assert "DynamicUser" not in unit["Service"]  # a static user: its files outlive the unit
    assert unit["Service"].get("AmbientCapabilities", [""]) == [""]


@pytest.mark.unit
def test_network_is_ip_and_unix_sockets_only(unit: Unit) -> None:
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


@pytest.mark.unit
def test_watchdog_and_file_limit(unit: Unit) -> None:
    assert int(one(unit, "WatchdogSec")) == 60
    assert 256 <= int(one(unit, "LimitNOFILE")) <= 4096


@pytest.mark.unit
def test_exec_start_runs_the_agent_with_its_config(unit: Unit) -> None:
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv[0].startswith("/"), "systemd wants an absolute program path"
    if Path(argv[0]).name == "env":
        argv = argv[1:]
    assert Path(argv[0]).name == "fleet-agent"
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown option
    assert args.command == "run"
    assert "--config" in argv
    config = Path(args.config)
    assert config.is_absolute()
    assert config.parent == Path("/etc") / one(unit, "ConfigurationDirectory")


@pytest.mark.unit
def test_the_state_directory_is_the_agents_default_and_the_examples(unit: Unit) -> None:
    state = Path("/var/lib") / one(unit, "StateDirectory")
    assert state == DEFAULT_STATE_DIR
    example = tomllib.loads((REPO / "agent" / "agent.example.toml").read_text())
    assert Path(example["agent"]["state_dir"]) == state


@pytest.mark.unit
def test_no_restart_for_what_a_restart_cannot_fix(unit: Unit) -> None:
    codes = {int(code) for code in one(unit, "RestartPreventExitStatus").split()}
    assert {EXIT_USAGE, EXIT_REVOKED} <= codes
    assert not {EXIT_FAILED, EXIT_TRANSIENT} & codes  # those may succeed next time


@pytest.mark.unit
def test_the_readme_explains_the_exit_codes() -> None:
    text = (REPO / "packaging" / "README.md").read_text()
    for code in (EXIT_USAGE, EXIT_REVOKED):
        assert f"| {code} |" in text
    assert "useradd --system" in text
    assert "systemctl enable --now fleet-agent" in text


@pytest.mark.unit
def test_the_parser_keeps_repeated_keys_and_resets() -> None:
    unit = parse_unit("[Service]\nA=1\nA=2\\\n  3\n; note\nB=x\nB=\n")
    assert unit == {"Service": {"A": ["1", "2 3"], "B": [""]}}


# -------------------------------------------------------------- systemd-analyze

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze not installed")


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Clean apart from the agent not being installed here: verify checks that ExecStart's
    program exists, so a copy runs it through /usr/bin/env (which the unit allows too)."""
    text = UNIT.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    program = shlex.split(exec_start.partition("=")[2])[0]
    copy = tmp_path / "fleet-agent.service"
    copy.write_text(text.replace(f"ExecStart={program} ", "ExecStart=/usr/bin/env fleet-agent "))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_analyze
def test_systemd_analyze_security_exposure_is_low() -> None:
    """At most 2.0 on systemd's 0-10 scale ("OK"); --threshold counts in tenths."""
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot rate unit files offline: {result.stderr}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
