"""CA, key/cert files, CRL validation, and the init / issue-claim / revoke file layout."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import bootstrap
from broker.pki import (
    CertificateAuthority,
    PkiError,
    PkiPaths,
    certificate_id,
    generate_private_key,
    load_certificate,
    load_crl,
    load_private_key,
    write_crl,
    write_private_key,
    write_public_file,
)
from broker.registry import (
    CertificateRole,
    CertificateStatus,
    InvalidName,
    SQLiteRegistry,
    UnknownTarget,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files


def test_private_key_is_0600_even_with_umask_0(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "device.key"
    key = generate_private_key()
    write_private_key(path, key)
    assert mode_of(path) == 0o600
    assert load_private_key(path).private_numbers() == key.private_numbers()


def test_public_file_mode_ignores_umask(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "x.pem"
    write_public_file(path, b"data")
    assert mode_of(path) == 0o644
    write_public_file(path, b"other", mode=0o640)
    assert mode_of(path) == 0o640
    assert path.read_bytes() == b"other"


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    write_private_key(tmp_path / "a.key", generate_private_key())
    write_private_key(tmp_path / "a.key", generate_private_key())  # replaces
    write_public_file(tmp_path / "a.pem", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "a.pem"]


def test_key_written_as_unencrypted_pkcs8(tmp_path: Path) -> None:
    write_private_key(tmp_path / "k", generate_private_key())
    assert (tmp_path / "k").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_private_key_owner(tmp_path: Path) -> None:
    write_private_key(tmp_path / "k", generate_private_key(), owner_uid=4242)
    assert (tmp_path / "k").stat().st_uid == 4242


def test_load_errors_name_the_file_and_never_the_content(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(PkiError, match=r"missing\.key does not exist; run `fleet-broker init`"):
        load_private_key(missing)

    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nTOPSECRETBYTES\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PkiError) as caught:
        load_private_key(garbage)
    assert "garbage.key is not an unencrypted PEM private key" in str(caught.value)
    assert "TOPSECRET" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__

    with pytest.raises(PkiError, match="is not a PEM certificate"):
        load_certificate(garbage)
    with pytest.raises(PkiError, match="is a folder"):
        load_certificate(tmp_path)


def test_certificate_id_is_sha256_of_der(ca: CertificateAuthority) -> None:
    der = ca.certificate.public_bytes(serialization.Encoding.DER)
    assert certificate_id(ca.certificate) == hashlib.sha256(der).hexdigest()
    assert len(certificate_id(ca.certificate)) == 64


# --- certificates


def test_ca_certificate(ca: CertificateAuthority) -> None:
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert ca.certificate.not_valid_before_utc < dt.datetime.now(dt.timezone.utc)
    ca.certificate.verify_directly_issued_by(ca.certificate)


def test_server_certificate_names_and_usage(ca: CertificateAuthority) -> None:
    cert = ca.issue(
        generate_private_key().public_key(),
        common_name="broker",
        days=30,
        purpose="server",
        dns_names=["localhost", "broker.example.com"],
        ip_addresses=["127.0.0.1", "::1", "192.0.2.7"],
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "broker.example.com"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("192.0.2.7"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.certificate)


def test_bad_ip_address_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="'not-an-ip' is not an IP address"):
        ca.issue(
            generate_private_key().public_key(),
            common_name="x",
            days=1,
            purpose="server",
            ip_addresses=["not-an-ip"],
        )


def test_client_certificate_chains_to_ca(ca: CertificateAuthority) -> None:
    cert = ca.issue(
        generate_private_key().public_key(), common_name="dev", days=365, purpose="client"
    )
    cert.verify_directly_issued_by(ca.certificate)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_sign_csr_keeps_key_and_subject(ca: CertificateAuthority) -> None:
    key = generate_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thing-1")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    cert = ca.sign_csr(csr, days=10)
    assert cert.subject == subject
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    cert.verify_directly_issued_by(ca.certificate)


def test_ca_load_roundtrip_and_mismatch(tmp_path: Path, ca: CertificateAuthority) -> None:
    paths = PkiPaths(tmp_path)
    write_public_file(paths.ca_cert, ca.certificate.public_bytes(serialization.Encoding.PEM))
    write_private_key(paths.ca_key, ca.private_key)
    assert CertificateAuthority.load(paths).certificate == ca.certificate
    write_private_key(paths.ca_key, generate_private_key())
    with pytest.raises(PkiError, match="does not belong to"):
        CertificateAuthority.load(paths)


# --- CRL


def test_crl_lists_revoked_serials_and_validates(tmp_path: Path, ca: CertificateAuthority) -> None:
    when = dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)
    crl = ca.build_crl([(1234, when), (99, when)])
    ca.validate_crl(crl)
    assert {entry.serial_number for entry in crl} == {1234, 99}
    paths = PkiPaths(tmp_path)
    write_crl(paths, ca, crl)
    assert mode_of(paths.crl) == 0o644
    assert load_crl(paths.crl).get_revoked_certificate_by_serial_number(1234) is not None


def test_crl_number_increases(ca: CertificateAuthority) -> None:
    first = ca.build_crl([]).extensions.get_extension_for_class(x509.CRLNumber).value
    second = ca.build_crl([]).extensions.get_extension_for_class(x509.CRLNumber).value
    assert second.crl_number > first.crl_number


def test_crl_from_another_ca_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create()  # same subject, different key
    crl = other.build_crl([])
    with pytest.raises(PkiError, match="signature does not verify"):
        ca.validate_crl(crl)
    with pytest.raises(PkiError):
        write_crl(PkiPaths(tmp_path), ca, crl)
    assert not PkiPaths(tmp_path).crl.exists()

    stranger = CertificateAuthority.create(common_name="someone else")
    with pytest.raises(PkiError, match="not by this CA"):
        ca.validate_crl(stranger.build_crl([]))


def test_expired_crl_is_refused(ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - dt.timedelta(days=10))
        .next_update(now - dt.timedelta(days=1))
        .sign(ca.private_key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="expired"):
        ca.validate_crl(crl)


def test_garbage_crl_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(b"-----BEGIN X509 CRL-----\nnope\n-----END X509 CRL-----\n")
    with pytest.raises(PkiError, match="is not a PEM CRL"):
        load_crl(path)


# --- init / issue-claim / revoke


def test_initialize_creates_everything(tmp_path: Path, open_umask: None) -> None:
    root = tmp_path / "certs"
    paths = bootstrap.initialize(root, hostnames=["broker.example.com", "192.0.2.5"])
    assert mode_of(root) == 0o755
    for key in (paths.ca_key, paths.broker_key, paths.claim_key, paths.service_key):
        assert mode_of(key) == 0o600, key
    for public in (paths.ca_cert, paths.broker_cert, paths.claim_cert, paths.crl):
        assert mode_of(public) == 0o644, public
    assert mode_of(paths.registry_dir) == 0o700
    owner = bootstrap.broker_file_owner()
    if owner is not None:
        assert paths.broker_key.stat().st_uid == owner
        assert paths.registry.stat().st_uid == owner
        assert paths.registry_dir.stat().st_uid == owner
    assert not list(root.glob(".*.tmp"))

    ca = CertificateAuthority.load(paths)
    broker = load_certificate(paths.broker_cert)
    broker.verify_directly_issued_by(ca.certificate)
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "broker.example.com"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "192.0.2.5",
    ]
    ca.validate_crl(load_crl(paths.crl))
    assert list(load_crl(paths.crl)) == []
    assert 'client_id = "fleet-services"' in paths.broker_config.read_text()

    with SQLiteRegistry.open(paths.registry) as registry:
        claim = registry.get_certificate(certificate_id(load_certificate(paths.claim_cert)))
        service = registry.get_certificate(certificate_id(load_certificate(paths.service_cert)))
    assert claim is not None and service is not None
    assert (claim.role, claim.status, claim.label) == (
        CertificateRole.CLAIM,
        CertificateStatus.ACTIVE,
        "shared claim",
    )
    assert (service.role, service.status) == (CertificateRole.SERVICE, CertificateStatus.ACTIVE)


def test_initialize_refuses_without_force_and_replaces_with_force(tmp_path: Path) -> None:
    paths = bootstrap.initialize(tmp_path)
    old_ca = paths.ca_cert.read_bytes()
    paths.broker_config.write_text("# edited by the operator\n")
    bootstrap.issue_claims(tmp_path, name="batch")
    with pytest.raises(PkiError, match=r"already holds a PKI \(ca.key\); pass --force"):
        bootstrap.initialize(tmp_path)
    assert paths.ca_cert.read_bytes() == old_ca

    bootstrap.initialize(tmp_path, force=True)
    assert paths.ca_cert.read_bytes() != old_ca
    assert paths.broker_config.read_text() == "# edited by the operator\n"  # kept
    assert not paths.claims_dir.exists()
    with SQLiteRegistry.open(paths.registry) as registry:
        assert len(registry.list_certificates()) == 2  # only the new claim + service


def test_initialize_checks_hostnames_before_deleting(tmp_path: Path) -> None:
    paths = bootstrap.initialize(tmp_path)
    old_ca = paths.ca_cert.read_bytes()
    with pytest.raises(PkiError, match="neither a DNS name nor an IP address"):
        bootstrap.initialize(tmp_path, hostnames=["bad name!"], force=True)
    assert paths.ca_cert.read_bytes() == old_ca


def test_issue_claims(tmp_path: Path, open_umask: None) -> None:
    paths = bootstrap.initialize(tmp_path)
    single = bootstrap.issue_claims(tmp_path, name="line-1")
    folder = paths.claims_dir / "line-1"
    assert single == [(folder / "claim.pem", folder / "claim.key")]
    batch = bootstrap.issue_claims(tmp_path, name="line-2", count=3)
    assert [cert.name for cert, _ in batch] == [
        "claim-0001.pem",
        "claim-0002.pem",
        "claim-0003.pem",
    ]
    ca = CertificateAuthority.load(paths)
    with SQLiteRegistry.open(paths.registry) as registry:
        for cert_path, key_path in [*single, *batch]:
            assert mode_of(key_path) == 0o600
            cert = load_certificate(cert_path)
            cert.verify_directly_issued_by(ca.certificate)
            assert cert.public_key() == load_private_key(key_path).public_key()
            record = registry.get_certificate(certificate_id(cert))
            assert record is not None
            assert record.role is CertificateRole.CLAIM
            assert record.status is CertificateStatus.ACTIVE
        labels = [r.label for r in registry.list_certificates(role=CertificateRole.CLAIM)]
    assert labels.count("line-2") == 3
    assert mode_of(paths.claims_dir / "line-2") == 0o700

    with pytest.raises(PkiError, match="already exists"):
        bootstrap.issue_claims(tmp_path, name="line-1")
    with pytest.raises(InvalidName, match="claim batch name"):
        bootstrap.issue_claims(tmp_path, name="../escape")
    with pytest.raises(ValueError, match="give 1 to 100000"):
        bootstrap.issue_claims(tmp_path, name="zero", count=0)


def test_issue_claims_needs_a_pki(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="run `fleet-broker init`"):
        bootstrap.issue_claims(tmp_path, name="x")


def test_revoke_updates_registry_and_crl(tmp_path: Path) -> None:
    paths = bootstrap.initialize(tmp_path)
    [(cert_path, _)] = bootstrap.issue_claims(tmp_path, name="b")
    cert = load_certificate(cert_path)
    revoked = bootstrap.revoke(tmp_path, certificate_id(cert)[:10])
    assert [r.id for r in revoked] == [certificate_id(cert)]
    crl = load_crl(paths.crl)
    CertificateAuthority.load(paths).validate_crl(crl)
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    with pytest.raises(UnknownTarget):
        bootstrap.revoke(tmp_path, "no-such-thing")


def test_refresh_crl(tmp_path: Path) -> None:
    paths = bootstrap.initialize(tmp_path)
    assert bootstrap.refresh_crl(tmp_path) is False  # fresh and in step with the registry
    assert bootstrap.refresh_crl(tmp_path, min_days_left=400) is True  # expires within 400 days

    paths.crl.write_text("garbage")
    assert bootstrap.refresh_crl(tmp_path) is True
    CertificateAuthority.load(paths).validate_crl(load_crl(paths.crl))

    # A revocation recorded in the registry but missing from the CRL (crash in between).
    with SQLiteRegistry.open(paths.registry) as registry:
        [claim] = registry.list_certificates(role=CertificateRole.CLAIM)
        registry.set_certificate_status(claim.id, CertificateStatus.REVOKED)
    assert bootstrap.refresh_crl(tmp_path) is True
    assert len(list(load_crl(paths.crl))) == 1
