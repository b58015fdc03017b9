"""The broker side's certificate authority and the files it keeps under certs/.

Keys and certificates are ECDSA P-256 made with `cryptography`. Every file is written atomically
(temp file in the same folder, fsync, rename, fsync of the folder) so that a crash never leaves a
half-written credential, and private keys are 0600 from their first byte whatever the umask.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.durable import write_atomic

# Keys this CA can sign with (SHA-256 works for both); new keys are always EC P-256.
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Certificates are back-dated so that a peer whose clock runs a little behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

INIT_FIX = "run `fleet-broker init` to create the PKI"


class PkiError(Exception):
    """A one-line, user-facing error naming the problem and the fix."""


@dataclass(frozen=True)
class PkiPaths:
    """Where `fleet-broker init` puts each file, all under one root folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def broker_cert(self) -> Path:
        return self.root / "broker.pem"

    @property
    def broker_key(self) -> Path:
        return self.root / "broker.key"

    @property
    def claim_cert(self) -> Path:
        return self.root / "claim.pem"

    @property
    def claim_key(self) -> Path:
        return self.root / "claim.key"

    @property
    def service_cert(self) -> Path:
        return self.root / "service.pem"

    @property
    def service_key(self) -> Path:
        return self.root / "service.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry"

    @property
    def registry(self) -> Path:
        return self.registry_dir / "registry.db"

    @property
    def claims_dir(self) -> Path:
        return self.root / "claims"

    @property
    def broker_config(self) -> Path:
        return self.root / "broker.toml"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --- files ----------------------------------------------------------------------------------------


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(
    path: Path, key: PrivateKey, *, owner_uid: int | None = None, sync_folder: bool = True
) -> None:
    """Write `key` unencrypted (PKCS8 PEM), mode 0600, optionally owned by `owner_uid`."""
    write_atomic(path, private_key_pem(key), 0o600, owner_uid=owner_uid, sync_folder=sync_folder)


def write_public_file(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    owner_uid: int | None = None,
    sync_folder: bool = True,
) -> None:
    write_atomic(path, data, mode, owner_uid=owner_uid, sync_folder=sync_folder)


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _read(path: Path, what: str, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist; {fix}") from None
    except IsADirectoryError:
        raise PkiError(f"{what} {path} is a folder, not a file; {fix}") from None
    except PermissionError:
        raise PkiError(
            f"cannot read {what} {path} (permission denied); run as its owner or as root"
        ) from None
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path} ({exc.strerror}); {fix}") from None


def load_private_key(path: Path) -> PrivateKey:
    """Load an unencrypted PEM private key. Errors name the file, never its content."""
    data = _read(path, "private key", INIT_FIX)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # `from None`: the parser's own exception must not travel with anything read from the file.
        raise PkiError(
            f"{path} is not an unencrypted PEM private key; replace it with the right file "
            f"or {INIT_FIX} again (--force)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path} holds an unsupported key type; use an EC P-256 or RSA key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    data = _read(path, "certificate", INIT_FIX)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(
            f"{path} is not a PEM certificate; replace it with the right file "
            f"or {INIT_FIX} again (--force)"
        ) from None


def load_crl(path: Path) -> x509.CertificateRevocationList:
    data = _read(path, "CRL", "run `fleet-broker revoke` or restart the broker to rebuild it")
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError:
        raise PkiError(
            f"{path} is not a PEM CRL; delete it and restart the broker to rebuild it"
        ) from None


def certificate_id(cert: x509.Certificate) -> str:
    """The AWS IoT certificate id: hex SHA-256 of the DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _same_public_key(a: CertificatePublicKeyTypes, b: CertificatePublicKeyTypes) -> bool:
    form = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*form) == b.public_bytes(*form)


# --- the CA ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateAuthority:
    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)

    @classmethod
    def create(
        cls, common_name: str = "mqtt-fleet root CA", days: int = 3650
    ) -> CertificateAuthority:
        _check_days(days)
        key = generate_private_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = utc_now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, paths: PkiPaths) -> CertificateAuthority:
        cert = load_certificate(paths.ca_cert)
        key = load_private_key(paths.ca_key)
        if not _same_public_key(cert.public_key(), key.public_key()):
            raise PkiError(
                f"{paths.ca_key} does not belong to {paths.ca_cert}; restore the matching pair "
                f"or {INIT_FIX} again (--force)"
            )
        return cls(cert, key)

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        *,
        common_name: str,
        days: int | None = None,
        validity: dt.timedelta | None = None,
        purpose: Literal["server", "client"],
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> x509.Certificate:
        """A certificate valid for ``days`` (or ``validity``) from now."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        for text in ip_addresses:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(text)))
            except ValueError:
                raise PkiError(f"{text!r} is not an IP address; pass e.g. 192.0.2.10") from None
        return self._issue(
            subject,
            public_key,
            validity=_validity(days, validity),
            purpose=purpose,
            alt_names=names,
        )

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        days: int | None = None,
        validity: dt.timedelta | None = None,
    ) -> x509.Certificate:
        """A client certificate for an already validated CSR's key and subject."""
        return self._issue(
            csr.subject, csr.public_key(), validity=_validity(days, validity), purpose="client"
        )

    def _issue(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        *,
        validity: dt.timedelta,
        purpose: Literal["server", "client"],
        alt_names: Sequence[x509.GeneralName] = (),
    ) -> x509.Certificate:
        now = utc_now()
        # A certificate outliving its CA would fail verification anyway; say so in its dates.
        not_after = min(now + validity, self.certificate.not_valid_after_utc)
        server = purpose == "server"
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=isinstance(public_key, ec.EllipticCurvePublicKey),
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        if alt_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(list(alt_names)), critical=False
            )
        return builder.sign(self.private_key, hashes.SHA256())

    def build_crl(
        self, revoked: Iterable[tuple[int, dt.datetime]], *, days: int = 365
    ) -> x509.CertificateRevocationList:
        _check_days(days)
        now = utc_now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + dt.timedelta(days=days))
            # Microseconds rather than seconds: two revocations in one second still increase it.
            .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        for serial, revoked_at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .build()
            )
        return builder.sign(self.private_key, hashes.SHA256())

    def validate_crl(self, crl: x509.CertificateRevocationList) -> None:
        """Refuse a CRL Mosquitto must never load.

        An expired CRL locks every client out; a corrupt one is ignored on SIGHUP (fails open).
        """
        if crl.issuer != self.certificate.subject:
            raise PkiError(
                f"the CRL was issued by {crl.issuer.rfc4514_string()!r}, not by this CA; "
                "rebuild it with `fleet-broker revoke` or by restarting the broker"
            )
        public_key = self.certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or (
            not crl.is_signature_valid(public_key)
        ):
            raise PkiError(
                "the CRL's signature does not verify with this CA's key; rebuild it with "
                "`fleet-broker revoke` or by restarting the broker"
            )
        next_update = crl.next_update_utc
        if next_update is None or next_update <= utc_now():
            raise PkiError(
                "the CRL has expired (or has no next update) and would lock out every client; "
                "rebuild it by restarting the broker"
            )


MIN_VALIDITY = dt.timedelta(seconds=60)


def _validity(days: int | None, validity: dt.timedelta | None) -> dt.timedelta:
    """One of ``days`` (at least 1) or ``validity`` (at least a minute: short-lived
    certificates exist to exercise renewal)."""
    if (days is None) == (validity is None):
        raise ValueError("give exactly one of days= and validity=")
    if days is not None:
        _check_days(days)
        return dt.timedelta(days=days)
    assert validity is not None
    if validity < MIN_VALIDITY:
        raise PkiError(f"validity of {validity} is too short; give at least {MIN_VALIDITY}")
    return validity


def _check_days(days: int) -> None:
    if days < 1:
        raise PkiError(f"validity of {days} days is too short; give at least 1 day")


def write_crl(
    paths: PkiPaths, ca: CertificateAuthority, crl: x509.CertificateRevocationList
) -> None:
    """Validate, then atomically replace the broker's CRL (0644: the broker user reads it)."""
    ca.validate_crl(crl)
    write_public_file(paths.crl, crl.public_bytes(serialization.Encoding.PEM))
