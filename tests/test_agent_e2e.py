"""`fleet-agent provision` against the real stack (Mosquitto + plugin + services), as a real
subprocess, and the same onboarding in-process for many devices in one event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent import provisioning
from agent.keystore import Keystore, certificate_id, same_public_key
from agent.onboarding import Cause, ClaimSettings, OnboardingFailed, onboard
from agent.session import tls_context
from broker import bootstrap
from broker.registry import CertificateStatus
from tests.fleet import (
    REPO,
    Fleet,
    agent_config,
    fleet_agent,
    free_port,
    make_workdir,
    run_agent,
    running_fleet,
)

pytestmark = pytest.mark.commands

# A certificate ownership token is secrets.token_urlsafe(32): 43 URL-safe characters. No
# output line of the agent may hold a run that long.
TOKEN_LIKE = re.compile(r"[A-Za-z0-9_-]{40,}")
SUCCESS = re.compile(
    r"^provisioned thing (?P<thing>\S+) \(certificate (?P<cert>[0-9a-f]{12})…\) in \d+\.\d\d s$"
)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with running_fleet(services=True) as running:
        yield running


def assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    assert not TOKEN_LIKE.search(output), output
    assert "PRIVATE KEY" not in output


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert_clean(proc)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fleet-agent: ")
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def state_of(config: Path) -> Keystore:
    return Keystore(config.parent / "state")


# ----------------------------------------------------------------------- success


def test_provision_end_to_end(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-1")
    proc = run_agent(config)
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    match = SUCCESS.match(lines[0])
    assert match, lines[0]
    thing = match["thing"]
    assert thing == "generic-E2E-1"

    store = state_of(config)
    assert mode(store.root) == 0o700
    assert mode(store.key_path) == 0o600
    key = store.load_key()
    certificate = store.load_certificate()
    assert same_public_key(key, certificate)  # the CSR flow: the key never left the device
    record = store.load_record()
    assert record is not None
    assert record.thing_name == thing
    assert record.certificate_id == certificate_id(certificate)
    assert record.certificate_id.startswith(match["cert"])
    assert (record.endpoint, record.port) == (fleet.config.connect_host, fleet.config.port)

    with fleet.registry() as registry:
        stored = registry.get_certificate(record.certificate_id)
        assert stored is not None
        assert stored.status is CertificateStatus.ACTIVE and stored.thing_name == thing
        assert registry.get_thing(thing) is not None

    # The stored credentials work for the device: CONNACK and its own topics.
    from tests.fleet import Credentials

    device = fleet.client(Credentials(store.cert_path, store.key_path), thing)
    assert device.accepted
    # The claim files stay: remove_after_provisioning defaults to false (shared claims).
    assert fleet.pki.claim_cert.exists() and fleet.pki.claim_key.exists()


def test_already_provisioned_says_so_and_succeeds(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-AGAIN")
    assert run_agent(config).returncode == 0
    before = state_of(config).cert_path.read_bytes()
    proc = run_agent(config)
    assert_clean(proc)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("already provisioned as thing generic-E2E-AGAIN (certificate ")
    assert len(proc.stdout.splitlines()) == 1
    assert state_of(config).cert_path.read_bytes() == before


def test_force_provisions_again(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-FORCE-1")
    assert run_agent(config).returncode == 0
    first = state_of(config).load_record()
    proc = run_agent(config, "--force", "--set", "provisioning.parameters.SerialNumber=E2E-FORCE-2")
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    second = state_of(config).load_record()
    assert first is not None and second is not None
    assert second.thing_name == "generic-E2E-FORCE-2"
    assert second.certificate_id != first.certificate_id


def test_a_key_others_can_read_is_refused_with_the_fix(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-CHMOD")
    assert run_agent(config).returncode == 0
    key_path = state_of(config).key_path
    key_path.chmod(0o644)
    line = assert_one_line_failure(run_agent(config), code=2)  # the device's own setup: fix it
    assert f"chmod 600 {key_path}" in line


def test_one_per_device_claim_is_removed_after_success(fleet: Fleet) -> None:
    [(cert, key)] = bootstrap.issue_claims(fleet.pki.root, name="e2e-single")
    config = agent_config(
        fleet,
        "E2E-SINGLE",
        claim=(cert, key),
        extra="remove_after_provisioning = true\n",
    )
    proc = run_agent(config)
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert not cert.exists() and not key.exists()
    # Provisioned devices need no claim any more: running again still answers.
    again = run_agent(config)
    assert again.returncode == 0 and again.stdout.startswith("already provisioned")


# ----------------------------------------------------------------------- failures


def test_unknown_template_is_rejected_with_its_error_code(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-NOTEMPLATE")
    line = assert_one_line_failure(run_agent(config, "--set", "provisioning.template=nope"))
    assert "RegisterThing rejected: ResourceNotFound (404)" in line
    assert "Provisioning template nope does not exist." in line
    store = state_of(config)
    assert not store.key_path.exists() and not store.record_path.exists()


def test_thing_name_conflict_is_rejected(fleet: Fleet) -> None:
    assert run_agent(agent_config(fleet, "E2E-TWIN")).returncode == 0
    line = assert_one_line_failure(run_agent(agent_config(fleet, "E2E-TWIN")))
    assert "ResourceConflictsException (409)" in line


@pytest.mark.parametrize("how", ["registry", "crl"])
def test_revoked_claim_certificate_is_refused(fleet: Fleet, how: str) -> None:
    [(cert, key)] = bootstrap.issue_claims(fleet.pki.root, name=f"e2e-revoked-{how}")
    claim_id = certificate_id(x509.load_pem_x509_certificate(cert.read_bytes()))
    bootstrap.revoke(fleet.pki.root, claim_id)
    if how == "crl":
        fleet.stack.broker.reload()  # the broker now refuses it in the TLS handshake
        time.sleep(0.5)
    config = agent_config(fleet, f"E2E-REVOKED-{how}", claim=(cert, key))
    line = assert_one_line_failure(run_agent(config))
    assert line.startswith("fleet-agent: claim certificate refused: "), line
    if how == "registry":
        assert "Not authorized (0x87)" in line
    else:
        assert "certificate revoked" in line


def test_broker_unreachable(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-UNREACHABLE")
    port = free_port()
    line = assert_one_line_failure(run_agent(config, "--set", f"broker.port={port}"), code=3)
    assert f"broker unreachable: cannot reach the broker at 127.0.0.1:{port}" in line
    assert "Connection refused" in line


def test_untrusted_broker(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-UNTRUSTED")
    line = assert_one_line_failure(
        run_agent(config, "--set", f"broker.ca_file={fleet.pki.claim_cert}")
    )
    assert "TLS failure: the broker at 127.0.0.1:" in line and "is not trusted" in line


def test_config_problems_are_one_line_each(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-CONFIG")
    proc = run_agent(config, "--set", "broker.port=x", "--set", "broker.colour=blue")
    assert_clean(proc)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 2
    assert "broker.port must be an integer" in proc.stderr
    assert "unknown key broker.colour" in proc.stderr


def test_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "provision" in proc.stdout and "exit codes" in proc.stdout


# ---------------------------------------------------------------------- in-process


def settings_for(fleet: Fleet, context: object, serial: str, **kwargs: object) -> ClaimSettings:
    return ClaimSettings(
        endpoint=fleet.config.connect_host,
        port=fleet.config.port,
        ca_file=fleet.pki.ca_cert,
        claim_context=context,  # type: ignore[arg-type]
        parameters={"SerialNumber": serial},
        **kwargs,  # type: ignore[arg-type]
    )


def test_fifty_devices_onboard_concurrently_in_one_event_loop(fleet: Fleet) -> None:
    count = 50
    root = make_workdir()
    # One claim TLS context shared by every device, as the simulator will do.
    context = tls_context(fleet.pki.ca_cert, fleet.pki.claim_cert, fleet.pki.claim_key)
    stores = [Keystore(root / f"device-{i:02d}") for i in range(count)]

    async def everyone() -> list[object]:
        return await asyncio.gather(
            *(
                onboard(settings_for(fleet, context, f"LOOP-{i:02d}"), store)
                for i, store in enumerate(stores)
            )
        )

    done = asyncio.run(everyone())
    things = [d.result.thing_name for d in done]  # type: ignore[attr-defined]
    assert sorted(things) == [f"generic-LOOP-{i:02d}" for i in range(count)]
    assert len({d.result.certificate_id for d in done}) == count  # type: ignore[attr-defined]
    with fleet.registry() as registry:
        for store, outcome in zip(stores, done, strict=True):
            certificate = store.load_certificate()
            # Each device got a certificate for its own key, not another device's reply.
            assert same_public_key(store.load_key(), certificate)
            assert certificate_id(certificate) == outcome.result.certificate_id  # type: ignore[attr-defined]
            record = registry.get_certificate(outcome.result.certificate_id)  # type: ignore[attr-defined]
            assert record is not None and record.status is CertificateStatus.ACTIVE
            assert record.thing_name == outcome.result.thing_name  # type: ignore[attr-defined]


def test_the_ownership_token_is_never_written_or_logged(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tokens: list[str] = []
    real_parse = provisioning.parse_create_certificate_reply

    def spy(*args: object) -> provisioning.IssuedCertificate:
        issued = real_parse(*args)  # type: ignore[arg-type]
        tokens.append(issued.ownership_token)
        return issued

    monkeypatch.setattr(provisioning, "parse_create_certificate_reply", spy)
    caplog.set_level(logging.DEBUG)
    context = tls_context(fleet.pki.ca_cert, fleet.pki.claim_cert, fleet.pki.claim_key)
    store = Keystore(make_workdir() / "state")
    asyncio.run(onboard(settings_for(fleet, context, "E2E-TOKEN"), store))
    [token] = tokens
    assert len(token) >= 43
    for path in store.root.rglob("*"):
        assert token.encode() not in path.read_bytes(), path
    assert token not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_in_process_failure_names_the_cause(fleet: Fleet) -> None:
    context = tls_context(fleet.pki.ca_cert, fleet.pki.claim_cert, fleet.pki.claim_key)
    store = Keystore(make_workdir() / "state")
    with pytest.raises(OnboardingFailed) as raised:
        asyncio.run(onboard(settings_for(fleet, context, "X", template="absent"), store))
    assert raised.value.cause is Cause.REJECTED and not raised.value.transient
    assert "ResourceNotFound" in str(raised.value)
    assert json.dumps(str(raised.value))  # a plain one-line string
    assert "\n" not in str(raised.value)


def test_run_without_the_templates_parameters_stops_with_exit_2_naming_them(
    fleet: Fleet,
) -> None:
    """packaging/README's sample once had no SerialNumber: under systemd that was a claim
    connection and a signed CSR every 5 s forever. Now it is a config error (exit 2, which
    the unit does not restart) that names the section to fill in."""
    config = agent_config(fleet, None)
    result = fleet_agent("run", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "InvalidParameters" in result.stderr and "[provisioning.parameters]" in result.stderr


def test_connect_proves_the_provisioned_identity_and_names_a_refusal(fleet: Fleet) -> None:
    config = agent_config(fleet, "E2E-CONNECT")
    assert run_agent(config).returncode == 0
    proved = fleet_agent("connect", "--config", str(config))
    assert proved.returncode == 0, proved.stderr
    assert "as thing generic-E2E-CONNECT" in proved.stdout and "subscribed" in proved.stdout
    shown = fleet_agent("cert", "--json", "--config", str(config))
    cert = json.loads(shown.stdout)
    assert cert["thing"] == "generic-E2E-CONNECT" and cert["public_key"] == "EC secp256r1"
    assert "PRIVATE" not in shown.stdout
    bootstrap.revoke(fleet.pki.root, "generic-E2E-CONNECT")
    refused = fleet_agent("connect", "--config", str(config))
    assert refused.returncode == 4, refused.stderr
    assert "refused thing generic-E2E-CONNECT's certificate" in refused.stderr
