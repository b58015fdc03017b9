"""The claim flow as pure logic: messages in, messages out. No broker, no asyncio."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent import wire
from agent.keystore import generate_key
from agent.provisioning import (
    ClaimFlow,
    ProtocolViolation,
    ProvisioningRejected,
    ProvisioningResult,
    Request,
    RetryPolicy,
    Step,
    build_csr,
    create_certificate_request,
    register_thing_request,
)
from broker.pki import CertificateAuthority, certificate_pem, private_key_pem
from tests.fleet import fleet_agent, free_port, make_workdir, run_agent

pytestmark = pytest.mark.commands

TOKEN = "tok-" + "s3cr3t" * 8
CSR_TOPIC = wire.create_certificate_from_csr()
REGISTER_TOPIC = wire.register_thing("fleet-default")


def accepted(topic: str) -> str:
    return wire.reply(topic, wire.ACCEPTED)


def rejected(topic: str) -> str:
    return wire.reply(topic, wire.REJECTED)


def issued(cert_id: str = "a" * 64) -> bytes:
    return json.dumps(
        {"certificateId": cert_id, "certificatePem": "PEM", "certificateOwnershipToken": TOKEN}
    ).encode()


def registered(thing: str = "generic-SN-1", config: object = None) -> bytes:
    document: dict[str, object] = {"thingName": thing}
    document["deviceConfiguration"] = {"k": "v"} if config is None else config
    return json.dumps(document).encode()


def rejection(status: int, code: str, message: str) -> bytes:
    return json.dumps({"statusCode": status, "errorCode": code, "errorMessage": message}).encode()


@pytest.fixture
def flow() -> ClaimFlow:
    return ClaimFlow(generate_key(), parameters={"SerialNumber": "SN-1"})


# ------------------------------------------------------------------------ messages


@pytest.mark.unit
def test_csr_is_signed_by_the_key_with_the_configured_subject() -> None:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, "my-device").encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "my-device"
    assert csr.public_key() == key.public_key()


@pytest.mark.unit
def test_csr_default_subject_is_fleet_agent() -> None:
    csr = x509.load_pem_x509_csr(build_csr(generate_key()).encode())
    assert csr.subject.rfc4514_string() == "CN=fleet-agent"


@pytest.mark.unit
@pytest.mark.parametrize("key_type", ["ec-p384", "rsa-2048"])
def test_csr_for_other_key_types(key_type: str) -> None:
    key = generate_key(key_type)  # type: ignore[arg-type]
    csr = x509.load_pem_x509_csr(build_csr(key).encode())
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey | rsa.RSAPublicKey)


@pytest.mark.unit
def test_create_certificate_request_is_the_aws_message() -> None:
    request = create_certificate_request("CSR PEM")
    assert request.topic == "$aws/certificates/create-from-csr/json"
    assert json.loads(request.payload) == {"certificateSigningRequest": "CSR PEM"}
    assert request.reply_topics == (
        "$aws/certificates/create-from-csr/json/accepted",
        "$aws/certificates/create-from-csr/json/rejected",
    )


@pytest.mark.unit
def test_register_thing_request_is_the_aws_message() -> None:
    request = register_thing_request("fleet-default", TOKEN, {"SerialNumber": "SN-1"})
    assert request.topic == "$aws/provisioning-templates/fleet-default/provision/json"
    assert json.loads(request.payload) == {
        "certificateOwnershipToken": TOKEN,
        "parameters": {"SerialNumber": "SN-1"},
    }
    assert request.reply_topics == (accepted(request.topic), rejected(request.topic))


@pytest.mark.unit
def test_register_thing_without_parameters_omits_them() -> None:
    request = register_thing_request("fleet-default", TOKEN)
    assert json.loads(request.payload) == {"certificateOwnershipToken": TOKEN}


@pytest.mark.unit
@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "x" * 37, "with space"])
def test_template_names_that_would_break_the_topic_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="template name"):
        register_thing_request(name, TOKEN)
    with pytest.raises(ValueError, match="template name"):
        ClaimFlow(generate_key(), template=name)


@pytest.mark.unit
def test_parameters_must_be_strings() -> None:
    with pytest.raises(ValueError, match="strings"):
        ClaimFlow(generate_key(), parameters={"SerialNumber": 7})  # type: ignore[dict-item]


# ------------------------------------------------------------------------ the flow


@pytest.mark.unit
def test_subscribe_to_every_reply_before_the_first_publish(flow: ClaimFlow) -> None:
    assert set(flow.reply_topics()) == {
        accepted(CSR_TOPIC),
        rejected(CSR_TOPIC),
        accepted(REGISTER_TOPIC),
        rejected(REGISTER_TOPIC),
    }


@pytest.mark.unit
def test_happy_path(flow: ClaimFlow) -> None:
    first = flow.start()
    assert first.topic == CSR_TOPIC and flow.step is Step.CREATE_CERTIFICATE
    csr = x509.load_pem_x509_csr(json.loads(first.payload)["certificateSigningRequest"].encode())
    assert csr.is_signature_valid

    second = flow.receive(accepted(CSR_TOPIC), issued())
    assert isinstance(second, Request) and second.topic == REGISTER_TOPIC
    assert json.loads(second.payload) == {
        "certificateOwnershipToken": TOKEN,
        "parameters": {"SerialNumber": "SN-1"},
    }
    assert flow.step is Step.REGISTER_THING and flow.certificate_id == "a" * 64

    result = flow.receive(accepted(REGISTER_TOPIC), registered())
    assert result == ProvisioningResult("generic-SN-1", "a" * 64, "PEM", {"k": "v"})
    assert flow.step is Step.DONE and flow.pending is None
    assert flow.result == result


@pytest.mark.unit
def test_the_pending_request_is_what_a_retry_resends(flow: ClaimFlow) -> None:
    first = flow.start()
    assert flow.pending == first
    second = flow.receive(accepted(CSR_TOPIC), issued())
    assert flow.pending == second


@pytest.mark.unit
def test_empty_device_configuration_is_fine(flow: ClaimFlow) -> None:
    flow.start()
    flow.receive(accepted(CSR_TOPIC), issued())
    result = flow.receive(accepted(REGISTER_TOPIC), json.dumps({"thingName": "t"}).encode())
    assert isinstance(result, ProvisioningResult) and result.device_configuration == {}


@pytest.mark.unit
def test_create_certificate_rejected(flow: ClaimFlow) -> None:
    flow.start()
    with pytest.raises(ProvisioningRejected) as raised:
        flow.receive(rejected(CSR_TOPIC), rejection(400, "InvalidCSR", "bad CSR"))
    error = raised.value
    assert (error.status_code, error.error_code, error.error_message, error.step) == (
        400,
        "InvalidCSR",
        "bad CSR",
        Step.CREATE_CERTIFICATE,
    )
    assert str(error) == "CreateCertificateFromCsr rejected: InvalidCSR (400): bad CSR"


@pytest.mark.unit
def test_register_thing_rejected_names_the_step_and_never_the_token(flow: ClaimFlow) -> None:
    flow.start()
    flow.receive(accepted(CSR_TOPIC), issued())
    with pytest.raises(ProvisioningRejected) as raised:
        flow.receive(
            rejected(REGISTER_TOPIC),
            rejection(404, "ResourceNotFound", "Provisioning template x does not exist."),
        )
    assert raised.value.step is Step.REGISTER_THING
    assert raised.value.error_code == "ResourceNotFound"
    assert TOKEN not in str(raised.value) and TOKEN not in repr(raised.value)


@pytest.mark.unit
def test_a_rejection_with_odd_fields_still_parses(flow: ClaimFlow) -> None:
    flow.start()
    with pytest.raises(ProvisioningRejected) as raised:
        flow.receive(rejected(CSR_TOPIC), b'{"statusCode": "500"}')
    assert raised.value.status_code == 0 and raised.value.error_code == "Unknown"


@pytest.mark.unit
def test_the_token_is_in_no_repr(flow: ClaimFlow) -> None:
    flow.start()
    second = flow.receive(accepted(CSR_TOPIC), issued())
    assert TOKEN not in repr(second)
    assert TOKEN not in repr(flow)
    assert TOKEN not in repr(flow._issued)


@pytest.mark.unit
@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b"{}",
        json.dumps({"certificateId": "x", "certificatePem": "P"}).encode(),
        json.dumps(
            {"certificateId": 1, "certificatePem": "P", "certificateOwnershipToken": "t"}
        ).encode(),
    ],
)
def test_malformed_certificate_reply_is_a_protocol_violation(
    flow: ClaimFlow, payload: bytes
) -> None:
    flow.start()
    with pytest.raises(ProtocolViolation):
        flow.receive(accepted(CSR_TOPIC), payload)


@pytest.mark.unit
@pytest.mark.parametrize(
    "payload",
    [registered("bad/name"), registered(config={"n": 1}), registered(config=["x"]), b"{}"],
)
def test_malformed_register_reply_is_a_protocol_violation(flow: ClaimFlow, payload: bytes) -> None:
    flow.start()
    flow.receive(accepted(CSR_TOPIC), issued())
    with pytest.raises(ProtocolViolation):
        flow.receive(accepted(REGISTER_TOPIC), payload)


@pytest.mark.unit
def test_a_reply_on_a_foreign_topic_is_refused(flow: ClaimFlow) -> None:
    flow.start()
    with pytest.raises(ValueError, match="not a reply"):
        flow.receive(accepted(REGISTER_TOPIC), registered())


@pytest.mark.unit
def test_receive_before_start_is_a_bug(flow: ClaimFlow) -> None:
    with pytest.raises(RuntimeError):
        flow.receive(accepted(CSR_TOPIC), issued())


# ------------------------------------------------------------------------- retries


def reject(status: int) -> ProvisioningRejected:
    return ProvisioningRejected(status, "X", "x", Step.REGISTER_THING)


@pytest.mark.unit
@pytest.mark.parametrize("status", [429, 500, 503, 599])
def test_throttling_and_server_errors_are_transient(status: int) -> None:
    assert RetryPolicy.is_transient(reject(status))
    assert RetryPolicy().delay(1, reject(status)) is not None


@pytest.mark.unit
@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 0])
def test_client_errors_fail_at_once(status: int) -> None:
    assert not RetryPolicy.is_transient(reject(status))
    assert RetryPolicy().delay(1, reject(status)) is None


@pytest.mark.unit
def test_backoff_is_exponential_capped_and_full_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=4.0)
    ceilings = [policy.delay(n, reject(500), lambda _lo, hi: hi) for n in range(1, 7)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    floors = [policy.delay(n, reject(500), lambda lo, _hi: lo) for n in range(1, 4)]
    assert floors == [0.0, 0.0, 0.0]  # full jitter: anywhere from zero to the ceiling


@pytest.mark.unit
def test_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.delay(2, reject(500)) is not None
    assert policy.delay(3, reject(500)) is None


@pytest.mark.unit
def test_timeouts_are_retried_unless_told_not() -> None:
    assert RetryPolicy().delay(1, TimeoutError()) is not None
    assert RetryPolicy(retry_timeouts=False).delay(1, TimeoutError()) is None


@pytest.mark.unit
def test_the_agent_imports_nothing_from_broker_or_simulator() -> None:
    import ast

    folder = Path(__file__).resolve().parent.parent / "agent"
    for source in folder.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in ("broker", "simulator", "tests"), (source, name)


# ------------------------------------------------------------ the claim key on the CLI
# No broker needed: a claim key others can read is refused before any connection.


def claim_device(key_mode: int) -> tuple[Path, Path, bytes]:
    """An agent.toml with a real claim certificate and key (the key chmod-ed to ``key_mode``
    after writing, so that it has that mode whatever the umask, as root too), pointing at a
    closed port. Returns the config, the key's path and the key's PEM."""
    folder = make_workdir()
    key = generate_key()
    ca = CertificateAuthority.create(days=1)
    cert = ca.issue(key.public_key(), common_name="claim", days=1, purpose="client")
    (folder / "ca.pem").write_bytes(certificate_pem(ca.certificate))
    (folder / "claim.pem").write_bytes(certificate_pem(cert))
    pem = private_key_pem(key)
    key_path = folder / "claim.key"
    key_path.write_bytes(pem)
    key_path.chmod(key_mode)
    assert stat.S_IMODE(key_path.stat().st_mode) == key_mode
    config = folder / "agent.toml"
    config.write_text(
        f"""
[broker]
endpoint = "127.0.0.1"
port = {free_port()}
ca_file = "{folder / "ca.pem"}"

[claim]
certificate = "{folder / "claim.pem"}"
key = "{key_path}"

[provisioning]
timeout = 2
max_attempts = 1

[agent]
state_dir = "{folder / "state"}"
"""
    )
    return config, key_path, pem


def assert_no_key_material(proc: subprocess.CompletedProcess[str], pem: bytes) -> None:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "PRIVATE KEY" not in output, output
    body = [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]
    assert not any(line in output for line in body), output


def assert_claim_key_refused(proc: subprocess.CompletedProcess[str], key: Path, pem: bytes) -> None:
    assert_no_key_material(proc, pem)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("fleet-agent: ") and f"claim key {key} is mode 644" in line, line
    assert line.endswith(f"run: chmod 600 {key}"), line


def test_provision_refuses_a_world_readable_claim_key() -> None:
    config, key, pem = claim_device(0o644)
    proc = run_agent(config)
    assert_claim_key_refused(proc, key, pem)
    assert not (config.parent / "state" / "device.key").exists()


def test_run_refuses_a_world_readable_claim_key() -> None:
    config, key, pem = claim_device(0o644)
    proc = fleet_agent("run", "--config", str(config), timeout=30)
    assert_claim_key_refused(proc, key, pem)


@pytest.mark.parametrize("key_mode", [0o600, 0o644], ids=["0600", "0644"])
def test_the_claim_key_is_never_logged(key_mode: int) -> None:
    # Used (the broker is just not there: exit 3) or refused (exit 2): at debug level, no
    # line of the agent's output holds any of the claim key. (`run` with a usable claim
    # retries an unreachable broker forever, so it is only run with the refused one.)
    config, _, pem = claim_device(key_mode)
    for command in ("provision",) if key_mode == 0o600 else ("provision", "run"):
        proc = fleet_agent(
            command, "--config", str(config), "--set", "agent.log_level=debug", timeout=30
        )
        assert proc.returncode == (3 if key_mode == 0o600 else 2), (proc.returncode, proc.stderr)
        assert_no_key_material(proc, pem)


def test_a_state_dir_that_is_a_file_is_named_with_exit_2(tmp_path: Path) -> None:
    """Not 'internal error (NotADirectoryError)', exit 70: the config's own problem, exit 2
    (systemd's unit does not restart on 2)."""

    not_a_folder = tmp_path / "state"
    not_a_folder.write_text("")
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "c.key").chmod(0o600)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[broker]\nendpoint = "127.0.0.1"\nca_file = "{tmp_path / "ca.pem"}"\n'
        f'[claim]\ncertificate = "{tmp_path / "c.pem"}"\nkey = "{tmp_path / "c.key"}"\n'
        f'[agent]\nstate_dir = "{not_a_folder}"\n'
    )
    result = fleet_agent("provision", "--config", str(config))
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "internal error" not in result.stderr and "is not a folder" in result.stderr


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (e2fsprogs)")
def test_a_state_folder_the_agent_may_not_write_is_named_with_exit_2(tmp_path: Path) -> None:
    """What a root-owned state folder does to the agent's user, made real for root too with
    the immutable attribute: the path and the chown line, exit 2 (systemd stops), not an
    'internal error (PermissionError)', exit 70, restarted every 5 s."""

    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "c.key").chmod(0o600)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[broker]\nendpoint = "127.0.0.1"\nca_file = "{tmp_path / "ca.pem"}"\n'
        f'[claim]\ncertificate = "{tmp_path / "c.pem"}"\nkey = "{tmp_path / "c.key"}"\n'
        f'[agent]\nstate_dir = "{state}"\n'
    )
    if subprocess.run(["chattr", "+i", str(state)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable attribute")
    try:
        result = fleet_agent("run", "--config", str(config), timeout=30)
    finally:
        subprocess.run(["chattr", "-i", str(state)], check=True)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "permission denied" in result.stderr and "chown -R" in result.stderr
    assert "internal error" not in result.stderr
