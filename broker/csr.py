"""Validation of a certificate signing request sent by a device (CreateCertificateFromCsr).

Pure: takes the request's ``certificateSigningRequest`` string and either returns the parsed CSR or
raises a `Rejection` (``InvalidCSR``) whose message says what is wrong with it. Only the key types
that the broker's TLS accepts for client certificates are allowed: EC P-256 and P-384, RSA of at
least 2048 bits, signed with SHA-256, SHA-384 or SHA-512.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.rejection import Rejection, invalid_csr

DEFAULT_MAX_CSR_BYTES = 16384
MIN_RSA_BITS = 2048
ALLOWED_CURVES: dict[str, str] = {"secp256r1": "P-256", "secp384r1": "P-384"}
ALLOWED_HASHES: tuple[type[hashes.HashAlgorithm], ...] = (
    hashes.SHA256,
    hashes.SHA384,
    hashes.SHA512,
)
ALLOWED_KEYS_TEXT = "EC P-256, EC P-384 or RSA >= 2048 bits"

# The labels a PEM CSR may carry (OpenSSL still writes the legacy one with `-newhdr`).
_CSR_LABELS = frozenset({"CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"})
_BEGIN = re.compile(r"-----BEGIN ([^-\r\n]{0,64})-----")


def validate_csr(
    pem: object, *, max_bytes: int = DEFAULT_MAX_CSR_BYTES
) -> x509.CertificateSigningRequest:
    """The parsed CSR, if `pem` is one PEM CSR with a valid signature and an allowed key.

    `pem` is typed ``object`` on purpose: it comes straight from a device's JSON payload.
    Raises `Rejection` (400 InvalidCSR) otherwise.
    """
    if not isinstance(pem, str):
        raise invalid_csr("certificateSigningRequest must be a PEM string")
    if not pem.strip():
        raise invalid_csr("certificateSigningRequest cannot be empty")
    try:
        data = pem.encode("ascii")
    except UnicodeEncodeError:
        raise invalid_csr("certificateSigningRequest is not PEM (non-ASCII characters)") from None
    if len(data) > max_bytes:
        raise invalid_csr(f"certificateSigningRequest is larger than {max_bytes} bytes")

    labels = _BEGIN.findall(pem)
    if not labels:
        raise invalid_csr("certificateSigningRequest is not PEM (no -----BEGIN line)")
    if len(labels) > 1:
        raise invalid_csr(
            f"certificateSigningRequest must hold exactly one PEM block, found {len(labels)}"
        )
    if labels[0] not in _CSR_LABELS:
        raise invalid_csr(
            f"certificateSigningRequest holds a {labels[0]!r} PEM block, not a CERTIFICATE REQUEST"
        )
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise invalid_csr(
            "certificateSigningRequest is not a valid PEM certificate signing request "
            "(corrupt or truncated)"
        ) from None

    _check_key(csr)
    _check_signature(csr)
    return csr


def _check_key(csr: x509.CertificateSigningRequest) -> None:
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError):
        raise _key_not_allowed("an unsupported key type") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise _key_not_allowed(f"an EC key on curve {key.curve.name}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise _key_not_allowed(f"a {key.key_size}-bit RSA key")
    else:
        raise _key_not_allowed(f"a {_key_kind(key)} key")


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    try:
        algorithm = csr.signature_hash_algorithm
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        raise invalid_csr(
            "certificateSigningRequest signature uses an unsupported algorithm"
        ) from None
    if not isinstance(algorithm, ALLOWED_HASHES):
        name = algorithm.name if algorithm is not None else "none"
        raise invalid_csr(
            f"certificateSigningRequest signature hash {name} is not allowed "
            "(use SHA-256, SHA-384 or SHA-512)"
        )
    if not valid:
        raise invalid_csr("certificateSigningRequest signature is invalid")


def _key_not_allowed(what: str) -> Rejection:
    return invalid_csr(f"certificateSigningRequest has {what}; allowed keys: {ALLOWED_KEYS_TEXT}")


def _key_kind(key: object) -> str:
    name = type(key).__name__  # e.g. Ed25519PublicKey, DSAPublicKey
    return name.removesuffix("PublicKey") or name
