"""agent.toml: defaults, one clear line per problem, --set overrides, the shipped example."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
import tomllib
from cryptography.hazmat.primitives import serialization

from agent.config import ConfigError, load_config
from agent.config_show import toml_value
from agent.keystore import DEFAULT_STATE_DIR
from broker.pki import (
    CertificateAuthority,
    generate_private_key,
    write_private_key,
    write_public_file,
)
from tests.fleet import fleet_agent, run_into_a_closed_pipe

pytestmark = pytest.mark.commands

EXAMPLE = Path(__file__).resolve().parent.parent / "agent" / "agent.example.toml"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """ca.pem, and a claim certificate with its own key (config check pairs them)."""
    (tmp_path / "ca.pem").write_text("x")
    key = generate_private_key()
    cert = CLAIM_CA.issue(key.public_key(), common_name="claim", days=1, purpose="client")
    write_private_key(tmp_path / "claim.key", key)
    write_public_file(tmp_path / "claim.pem", cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "claim.key").chmod(0o600)  # chmod after writing: the umask may leave it 0644
    return tmp_path


CLAIM_CA = CertificateAuthority.create(days=2)


@pytest.mark.unit
def test_a_claim_key_that_does_not_match_its_certificate_is_named(folder: Path) -> None:
    write_private_key(folder / "claim.key", generate_private_key())  # another key
    found = problems(write(folder, MINIMAL))
    assert len(found) == 1 and "the key does not belong to the certificate" in found[0]


def write(folder: Path, text: str) -> Path:
    path = folder / "agent.toml"
    path.write_text(text)
    return path


MINIMAL = """
[broker]
endpoint = "broker.example.com"
ca_file = "ca.pem"
[claim]
certificate = "claim.pem"
key = "claim.key"
"""


def problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(path, overrides)
    return raised.value.problems


@pytest.mark.unit
def test_minimal_config_gets_the_defaults(folder: Path) -> None:
    config = load_config(write(folder, MINIMAL))
    assert config.broker.port == 8883
    assert config.broker.ca_file == folder / "ca.pem"  # relative to the config file
    assert config.claim.remove_after_provisioning is False
    assert config.provisioning.template == "fleet-default"
    assert config.provisioning.key_type == "ec-p256"
    assert config.provisioning.parameters == {}
    assert config.agent.state_dir == DEFAULT_STATE_DIR
    assert config.agent.log_level == "info"
    assert config.renewal.enabled and config.renewal.share == 0.8
    assert config.shadow.queue_max_bytes == 65536


@pytest.mark.unit
def test_the_shipped_example_is_valid(folder: Path) -> None:
    text = EXAMPLE.read_text()
    config = load_config(write(folder, text), ["agent.state_dir=state"])
    assert config.provisioning.parameters == {"SerialNumber": "SN-0001"}
    assert config.agent.state_dir == folder / "state"


@pytest.mark.unit
def test_overrides_are_parsed_by_the_type_each_key_expects(folder: Path) -> None:
    config = load_config(
        write(folder, MINIMAL),
        [
            "broker.port=8884",
            "claim.remove_after_provisioning=true",
            "provisioning.parameters.SerialNumber=0042",
            "provisioning.timeout=2.5",
            "agent.state_dir=/tmp/x",
        ],
    )
    assert config.broker.port == 8884
    assert config.claim.remove_after_provisioning is True
    assert config.provisioning.parameters == {"SerialNumber": "0042"}  # a string, zeros kept
    assert config.provisioning.timeout == 2.5
    assert config.agent.state_dir == Path("/tmp/x")


@pytest.mark.unit
def test_every_problem_is_reported_once_on_its_own_line(folder: Path) -> None:
    path = write(
        folder,
        """
[broker]
endpoint = "b"
prt = 1
port = "8883"
ca_file = "missing-ca.pem"
[claim]
certificate = "claim.pem"
[provisioning]
key_type = "dsa"
parameters = { SerialNumber = 12 }
[extra]
x = 1
""",
    )
    found = problems(path)
    text = "\n".join(found)
    assert len(found) == 7, text
    assert "unknown key broker.prt" in text and "known: endpoint, port, ca_file" in text
    assert "broker.port must be an integer, got '8883'" in text
    assert "CA file" in text and "missing-ca.pem does not exist" in text
    assert "claim.key is required" in text
    assert "key_type 'dsa' is unknown; use one of ec-p256, ec-p384, rsa-2048" in text
    assert "provisioning.parameters.SerialNumber must be a string" in text
    assert "unknown section [extra]" in text
    assert all(line.startswith(str(path)) for line in found)


@pytest.mark.unit
def test_unknown_section_is_reported(folder: Path) -> None:
    found = problems(write(folder, MINIMAL + "[extra]\nx = 1\n"))
    assert found == [
        f"{folder / 'agent.toml'}: unknown section [extra] (known: broker, "
        "claim, provisioning, agent, shadow, renewal)"
    ]


@pytest.mark.unit
def test_missing_claim_files_are_named(folder: Path) -> None:
    (folder / "claim.key").unlink()
    found = problems(write(folder, MINIMAL))
    assert len(found) == 1 and "claim key" in found[0] and "claim.key does not exist" in found[0]
    # A provisioned device may have removed its claim: that check can be skipped.
    load_config(folder / "agent.toml", check_claim_files=False)


@pytest.mark.unit
@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604], ids=["0644", "0640", "0604"])
def test_a_claim_key_others_can_read_is_refused(folder: Path, loose: int) -> None:
    key = folder / "claim.key"
    key.chmod(loose)
    assert stat.S_IMODE(key.stat().st_mode) == loose
    found = problems(write(folder, MINIMAL))
    assert found == [
        f"{folder / 'agent.toml'}: claim.key: claim key {key} is mode {loose:03o}, readable "
        f"by others; run: chmod 600 {key}"
    ]


def test_config_check_refuses_a_world_readable_claim_key(folder: Path) -> None:
    key = folder / "claim.key"
    key.chmod(0o644)  # as root too, the file really is 0644
    assert stat.S_IMODE(key.stat().st_mode) == 0o644
    config = write(folder, MINIMAL)
    proc = fleet_agent(
        "config", "check", "--config", str(config), "--set", f"agent.state_dir={folder / 'state'}"
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("fleet-agent: ") and str(key) in line
    assert line.endswith(f"run: chmod 600 {key}")
    assert "PRIVATE KEY" not in line and "c2VjcmV0" not in line
    # Tightened, the same config passes.
    key.chmod(0o600)
    proc = fleet_agent(
        "config", "check", "--config", str(config), "--set", f"agent.state_dir={folder / 'state'}"
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("broker.port=http", "broker.port must be an integer"),
        ("broker.port=70000", "broker.port must be 1-65535"),
        ("claim.remove_after_provisioning=maybe", "must be true or false"),
        ("nope.x=1", "unknown section [nope]"),
        ("broker.nope=1", "unknown key broker.nope"),
        ("port=1", "expected section.key=value"),
        ("broker.port", "expected section.key=value"),
        ("provisioning.parameters=x", "use provisioning.parameters.<Name>=<value>"),
        ("provisioning.template=a/b", "provisioning.template 'a/b' is invalid"),
        ("agent.log_level=loud", "agent.log_level 'loud' is unknown"),
        ("renewal.share=1.5", "renewal.share must be between 0.05 and 0.99"),
        ("renewal.enabled=sometimes", "renewal.enabled must be true or false"),
        ("renewal.retry_base=0", "renewal.retry_base must be between 1 and 86400"),
        ("renewal.retry_cap=10", "renewal.retry_cap must be between renewal.retry_base"),
        ("shadow.queue_max_bytes=10", "shadow.queue_max_bytes must be between 1024"),
    ],
)
def test_bad_overrides(folder: Path, override: str, message: str) -> None:
    found = problems(write(folder, MINIMAL), override)
    assert len(found) == 1 and message in found[0], found


@pytest.mark.unit
def test_not_toml_and_no_file(folder: Path) -> None:
    assert "not valid TOML" in problems(write(folder, "[broker"))[0]
    assert "no such config file" in problems(folder / "absent.toml")[0]


@pytest.mark.unit
def test_shadow_section_defaults_sync_the_classic_shadow(folder: Path) -> None:
    shadow = load_config(write(folder, MINIMAL)).shadow
    assert shadow.shadows == (None,)
    assert shadow.unhandled == "ignore" and shadow.command is None
    assert shadow.facts_key == "device" and shadow.report_interval == 300


@pytest.mark.unit
def test_shadow_section_is_validated_with_one_line_per_problem(folder: Path) -> None:
    (folder / "apply.sh").write_text("#!/bin/sh\necho '{}'\n")  # not executable
    found = problems(
        write(
            folder,
            MINIMAL
            + '[shadow]\nclassic = false\nnames = ["ok", "bad/name", "ok"]\n'
            + 'unhandled = "maybe"\ncommand = "apply.sh"\nreport_interval = 1\n',
        )
    )
    text = "\n".join(found)
    assert "'bad/name' is not a shadow name" in text
    assert "lists a shadow twice" in text
    assert "shadow.unhandled 'maybe' is unknown; use one of ignore, echo" in text
    assert f"run: chmod +x {folder / 'apply.sh'}" in text
    assert "report_interval must be between 5 and 86400" in text
    assert len(found) == 5


@pytest.mark.unit
def test_shadow_lists_can_be_overridden(folder: Path) -> None:
    config = load_config(write(folder, MINIMAL), ["shadow.names=config, lights"])
    assert config.shadow.shadows == (None, "config", "lights")
    found = problems(write(folder, MINIMAL + "[shadow]\nnames = [1]\n"))
    assert found == [f"{folder / 'agent.toml'}: shadow.names must be a list of strings, got [1]"]


@pytest.mark.unit
def test_control_socket_defaults_to_the_state_folder(folder: Path) -> None:
    agent = load_config(write(folder, MINIMAL)).agent
    assert agent.control_socket is None
    assert agent.socket_path == DEFAULT_STATE_DIR / "agent.sock"
    agent = load_config(write(folder, MINIMAL), ["agent.state_dir=/tmp/x"]).agent
    assert agent.socket_path == Path("/tmp/x/agent.sock")


@pytest.mark.unit
def test_control_socket_can_live_outside_the_state_folder(folder: Path) -> None:
    config = load_config(
        write(folder, MINIMAL + '[agent]\ncontrol_socket = "/run/fleet-agent/agent.sock"\n')
    )
    assert config.agent.control_socket == Path("/run/fleet-agent/agent.sock")
    assert config.agent.socket_path == Path("/run/fleet-agent/agent.sock")
    # A folder that does not exist yet is fine: the agent creates it (0700) at run.
    later = folder / "not" / "yet" / "agent.sock"
    config = load_config(write(folder, MINIMAL), [f"agent.control_socket={later}"])
    assert config.agent.socket_path == later
    # Empty: the default.
    config = load_config(write(folder, MINIMAL), ["agent.control_socket="])
    assert config.agent.socket_path == DEFAULT_STATE_DIR / "agent.sock"


@pytest.mark.unit
def test_control_socket_must_be_an_absolute_path(folder: Path) -> None:
    found = problems(write(folder, MINIMAL + '[agent]\ncontrol_socket = "run/agent.sock"\n'))
    assert found == [
        f"{folder / 'agent.toml'}: agent.control_socket must be an absolute path, got "
        "'run/agent.sock' (e.g. /run/fleet-agent/agent.sock)"
    ]


@pytest.mark.unit
def test_control_socket_problems_are_named(folder: Path) -> None:
    path = write(folder, MINIMAL)
    (folder / "plain").write_text("x")
    assert (
        "is a folder; name the socket file in it"
        in problems(path, f"agent.control_socket={folder}")[0]
    )
    assert (
        "exists and is not a socket"
        in problems(path, f"agent.control_socket={folder / 'plain'}")[0]
    )
    assert (
        f"{folder / 'plain'} is not a folder"
        in problems(path, f"agent.control_socket={folder / 'plain' / 'sub' / 'agent.sock'}")[0]
    )
    assert (
        "too long for a Unix socket"
        in problems(path, f"agent.control_socket=/run/{'x' * 120}.sock")[0]
    )
    assert (
        "must be a path (string)"
        in problems(write(folder, MINIMAL + "[agent]\ncontrol_socket = 1\n"))[0]
    )


def test_config_and_set_are_taken_before_or_after_the_command() -> None:
    from agent.cli import build_parser

    parser = build_parser()
    before = parser.parse_args(["--config", "a.toml", "--set", "x.y=1", "run", "--set", "z=2"])
    after = parser.parse_args(["run", "--config", "a.toml", "--set", "x.y=1", "--set", "z=2"])
    assert before.config == after.config == "a.toml"
    assert [*before.overrides, *before.overrides_after] == ["x.y=1", "z=2"]
    assert after.overrides_after == ["x.y=1", "z=2"]


def test_output_piped_into_a_closed_reader_is_no_error(folder: Path) -> None:
    """`fleet-agent config check | true`: the reader is gone; no 'internal error', exit 0."""
    import sys

    config = write(folder, MINIMAL)
    result = run_into_a_closed_pipe(
        [sys.executable, "-m", "agent.cli", "config", "check", "--config", str(config)]
    )
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr


def test_config_show_prints_toml_that_reads_back_to_the_same_settings(folder: Path) -> None:
    """`config show`: the file, --set applied and every default, as agent.toml; read back
    from the same folder it is the same configuration."""
    text = MINIMAL + '[provisioning.parameters]\nSerialNumber = "SN-1"\n"odd key" = "v\\u007f"\n'
    config = write(folder, text)
    overrides = ("shadow.report_interval=60", f"agent.state_dir={folder / 'state'}")
    proc = fleet_agent(
        "config", "show", "--config", str(config), *(f"--set={o}" for o in overrides)
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "port = 8883  # default" in proc.stdout
    assert "report_interval = 60.0\n" in proc.stdout  # --set: not a default
    assert 'endpoint = "broker.example.com"\n' in proc.stdout
    shown = folder / "shown.toml"
    shown.write_text(proc.stdout)
    original = load_config(config, overrides, check_claim_files=False)
    again = load_config(shown, check_claim_files=False)
    assert dataclasses.replace(again, path=config) == original


def test_config_show_names_every_problem_like_config_check(folder: Path) -> None:
    config = write(folder, MINIMAL.replace('endpoint = "broker.example.com"', "endpoint = 7"))
    proc = fleet_agent("config", "show", "--config", str(config))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"fleet-agent: {config}: broker.endpoint must be a string, got 7"
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    "value", ["plain", 'quo"te', "back\\slash", "tab\there", "new\nline", "del\x7f", "é€😀"]
)
def test_strings_are_rendered_as_toml_that_reads_back(value: str) -> None:
    assert tomllib.loads(f"k = {toml_value(value)}")["k"] == value
