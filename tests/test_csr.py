"""broker/csr.py: which CSRs a device may send to CreateCertificateFromCsr."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from broker.csr import validate_csr
from broker.rejection import Rejection

pytestmark = pytest.mark.unit

SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")])


def make_csr(key: CertificateIssuerPrivateKeyTypes) -> x509.CertificateSigningRequest:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return x509.CertificateSigningRequestBuilder().subject_name(SUBJECT).sign(key, algorithm)


def pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def der_to_pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + "\n".join(lines)
        + "\n"
        + ("-----END CERTIFICATE REQUEST-----\n")
    )


@pytest.fixture(scope="module")
def p256_pem() -> str:
    return pem(make_csr(ec.generate_private_key(ec.SECP256R1())))


def rejected(value: object, **kwargs: int) -> Rejection:
    with pytest.raises(Rejection) as info:
        validate_csr(value, **kwargs)
    assert info.value.status_code == 400
    assert info.value.error_code == "InvalidCSR"
    return info.value


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="ec-p256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), id="rsa-2048"),
    ],
)
def test_allowed_keys_are_accepted(key: object) -> None:
    csr = make_csr(key())  # type: ignore[operator]
    parsed = validate_csr(pem(csr))
    assert isinstance(parsed, x509.CertificateSigningRequest)
    assert parsed.subject == SUBJECT
    assert parsed.public_bytes(serialization.Encoding.DER) == csr.public_bytes(
        serialization.Encoding.DER
    )


def test_legacy_new_certificate_request_label_and_surrounding_whitespace(p256_pem: str) -> None:
    legacy = p256_pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
    assert validate_csr("\n  " + legacy + "\n\n").subject == SUBJECT


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1", id="ec-p521"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1", id="secp256k1"),
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), "1024-bit RSA", id="rsa-1024"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, "Ed25519", id="ed25519"),
        pytest.param(lambda: dsa.generate_private_key(1024), "DSA", id="dsa"),
    ],
)
def test_other_keys_are_rejected(key: object, fragment: str) -> None:
    error = rejected(pem(make_csr(key())))  # type: ignore[operator]
    assert fragment in error.error_message
    assert "allowed keys" in error.error_message


@pytest.mark.parametrize("value", [None, 42, b"-----BEGIN CERTIFICATE REQUEST-----", ["x"]])
def test_not_a_string(value: object) -> None:
    assert "PEM string" in rejected(value).error_message


@pytest.mark.parametrize("value", ["", "   \n"])
def test_empty(value: str) -> None:
    assert "empty" in rejected(value).error_message


def test_larger_than_max_bytes(p256_pem: str) -> None:
    assert validate_csr(p256_pem, max_bytes=len(p256_pem))
    assert "larger than 100 bytes" in rejected(p256_pem, max_bytes=100).error_message
    assert "larger than 16384" in rejected("A" * 16385).error_message


def test_garbage() -> None:
    assert "not PEM" in rejected("hello, I am a device").error_message


def test_non_ascii() -> None:
    assert "not PEM (non-ASCII" in rejected("-----BEGIN CERTIFICATE REQUEST-----\né").error_message


def test_der_is_not_pem(p256_pem: str) -> None:
    der = x509.load_pem_x509_csr(p256_pem.encode()).public_bytes(serialization.Encoding.DER)
    assert "not PEM" in rejected(der.decode("latin-1")).error_message
    assert "not PEM" in rejected(base64.b64encode(der).decode()).error_message


def test_certificate_instead_of_csr() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    error = rejected(cert.public_bytes(serialization.Encoding.PEM).decode())
    assert "'CERTIFICATE' PEM block" in error.error_message


def test_private_key_instead_of_csr_is_rejected_without_echoing_it() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    error = rejected(text)
    body = text.splitlines()[1]
    assert body not in error.error_message
    assert "PRIVATE KEY" in error.error_message


def test_truncated(p256_pem: str) -> None:
    assert "truncated" in rejected(p256_pem[: len(p256_pem) // 2]).error_message


def test_corrupt_base64_body(p256_pem: str) -> None:
    lines = p256_pem.splitlines()
    lines[1] = "!!!!" + lines[1][4:]
    assert "corrupt" in rejected("\n".join(lines)).error_message


def test_two_pem_blocks(p256_pem: str) -> None:
    assert "exactly one PEM block, found 2" in rejected(p256_pem + p256_pem).error_message


def test_tampered_signature(p256_pem: str) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(p256_pem.encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # last byte of the signature BIT STRING
    assert "signature" in rejected(der_to_pem(bytes(der))).error_message


def test_tampered_subject_breaks_signature(p256_pem: str) -> None:
    der = x509.load_pem_x509_csr(p256_pem.encode()).public_bytes(serialization.Encoding.DER)
    forged = der.replace(b"device-1", b"device-2")
    assert forged != der
    assert "signature is invalid" in rejected(der_to_pem(forged)).error_message


def test_rsa_tampered_signature() -> None:
    csr = make_csr(rsa.generate_private_key(65537, 2048))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    assert "signature is invalid" in rejected(der_to_pem(bytes(der))).error_message
