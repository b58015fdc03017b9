"""The device's state folder: its private key, its certificate and its provisioning record.

The folder (default ``/var/lib/fleet-agent``) is created 0700. Every file is written
atomically: a temporary file in the same folder, created with ``O_CREAT | O_EXCL`` and its final
mode from the first byte, written, fsynced, renamed over the target, and the folder fsynced. A
crash therefore leaves either the old file or the new one, never half a credential. The private
key is 0600 and never logged; the certificate ownership token is never written anywhere (it
lives in the claim flow's memory only).

Renewal stages a second set beside the first (``device.key.next``, ``device.pem.next``, then
``provisioning.json.next``, whose presence marks the set complete). The agent proves it by
connecting with it, then `Keystore.commit_staged` writes ``renewal.commit`` and renames the set
over the current one; `Keystore.ensure` rolls an interrupted switch forward (the marker is
there) and drops an incomplete staging (no record), so a crash at any moment leaves one usable
set: the old one until the commit point, the new one after it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from agent.durable import TEMP_PREFIX, fsync_folder, remove_durably, write_atomic
from agent.provisioning import PrivateKey

DEFAULT_STATE_DIR: Final = Path("/var/lib/fleet-agent")
KEY_FILE: Final = "device.key"
CERT_FILE: Final = "device.pem"
RECORD_FILE: Final = "provisioning.json"
STAGED_SUFFIX: Final = ".next"
COMMIT_MARKER: Final = "renewal.commit"

KeyType = Literal["ec-p256", "ec-p384", "rsa-2048"]
KEY_TYPES: Final[tuple[KeyType, ...]] = get_args(KeyType)


class KeystoreError(Exception):
    """The state folder or a file in it is unusable; the message says how to fix it."""


def generate_key(key_type: KeyType = "ec-p256") -> PrivateKey:
    """A new private key of the given type (P-256 unless told otherwise)."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def certificate_id(certificate: x509.Certificate) -> str:
    """AWS IoT's certificate id: the SHA-256 of the DER certificate, lowercase hex."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def same_public_key(key: PrivateKey, certificate: x509.Certificate) -> bool:
    def der(public: PublicKeyTypes) -> bytes:
        return public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return der(key.public_key()) == der(certificate.public_key())


def key_mode_problem(path: Path, mode: int, *, what: str) -> str | None:
    """The one-line refusal of a private key file (``what``: "device key", "claim key")
    that group or others may read or write, given its ``st_mode``; None if it is private.

    The one check for every private key the agent reads (the device key here, the claim key
    in agent.config), so that they are refused alike."""
    mode = stat.S_IMODE(mode)
    if not mode & 0o077:
        return None
    return f"{what} {path} is mode {mode:03o}, readable by others; run: chmod 600 {path}"


# --------------------------------------------------------------------- the record


@dataclass(frozen=True)
class ProvisioningRecord:
    """What the device knows about its registration: no secret in here."""

    thing_name: str
    certificate_id: str
    endpoint: str
    port: int
    provisioned_at: str  # ISO 8601, UTC

    @classmethod
    def now(
        cls, thing_name: str, certificate_id: str, endpoint: str, port: int
    ) -> ProvisioningRecord:
        stamp = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
        return cls(thing_name, certificate_id, endpoint, port, stamp)

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ProvisioningRecord:
        document = json.loads(data)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        record = cls(
            thing_name=document["thing_name"],
            certificate_id=document["certificate_id"],
            endpoint=document["endpoint"],
            port=document["port"],
            provisioned_at=document["provisioned_at"],
        )
        if not all(
            isinstance(v, str) for v in (record.thing_name, record.certificate_id, record.endpoint)
        ) or not isinstance(record.port, int):
            raise ValueError("fields of the wrong type")
        return record


# ---------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class Provisioned:
    """A complete, consistent set of device credentials."""

    record: ProvisioningRecord
    key_path: Path
    cert_path: Path


class Keystore:
    """One device's state folder."""

    def __init__(self, root: Path = DEFAULT_STATE_DIR) -> None:
        self.root = Path(root)

    @property
    def key_path(self) -> Path:
        return self.root / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.root / CERT_FILE

    @property
    def record_path(self) -> Path:
        return self.root / RECORD_FILE

    @staticmethod
    def staged_path(path: Path) -> Path:
        return path.with_name(path.name + STAGED_SUFFIX)

    @property
    def _credential_paths(self) -> tuple[Path, Path, Path]:
        """Key, certificate, record: the record last, as it marks a set complete."""
        return self.key_path, self.cert_path, self.record_path

    def ensure(self) -> None:
        """Create the folder 0700 (tighten it if we own it) and drop temp files of a crash."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = self.root.stat()
        except OSError as exc:
            raise KeystoreError(
                f"cannot create the state folder {self.root}: {exc.strerror}"
            ) from None
        if not stat.S_ISDIR(info.st_mode):
            raise KeystoreError(f"state folder {self.root} exists and is not a folder")
        if stat.S_IMODE(info.st_mode) != 0o700 and info.st_uid != os.geteuid():
            raise KeystoreError(
                f"state folder {self.root} is mode {stat.S_IMODE(info.st_mode):o} and "
                f"owned by another user; run: chown $(id -u) {self.root} && chmod 700 "
                f"{self.root}"
            )
        try:
            if stat.S_IMODE(info.st_mode) != 0o700:
                os.chmod(self.root, 0o700)
            for leftover in self._temporaries():
                with contextlib.suppress(OSError):
                    leftover.unlink()
            self._recover_renewal()
        except OSError as exc:
            # Read-only (a remount after disk errors, a read-only image), full, or a file
            # in there we may not replace: the agent cannot keep its state, so say where.
            raise KeystoreError(
                f"the state folder {self.root} refuses writes ({exc.strerror or exc}); the "
                "agent keeps its report queue, lock and renewed certificates there: make it "
                "writable (read-write mount, free space, owner) and start again"
            ) from None

    def _recover_renewal(self) -> None:
        """Finish a switch a crash interrupted; drop a staging a crash left incomplete."""
        if (self.root / COMMIT_MARKER).exists():
            self._switch_to_staged()
        elif not self.staged_path(self.record_path).exists():
            for path in self._credential_paths[:2]:
                remove_durably(self.staged_path(path))

    def _temporaries(self) -> Iterator[Path]:
        with contextlib.suppress(FileNotFoundError):
            for entry in self.root.iterdir():
                if entry.name.startswith(TEMP_PREFIX):
                    yield entry

    # ---------------------------------------------------------------- writes

    def save_key(self, key: PrivateKey) -> None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(self.key_path, pem, 0o600)

    def save_certificate(self, certificate_pem: str | bytes) -> None:
        data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
        x509.load_pem_x509_certificate(data)  # never store something unusable
        write_atomic(self.cert_path, data, 0o644)

    def save_record(self, record: ProvisioningRecord) -> None:
        write_atomic(self.record_path, record.to_json(), 0o644)

    def save_credentials(
        self, key: PrivateKey, certificate_pem: str, record: ProvisioningRecord
    ) -> None:
        """Key, certificate, then the record: the record marks a complete set, so it is
        removed first and written last."""
        self.ensure()
        remove_durably(self.record_path)
        self.save_key(key)
        self.save_certificate(certificate_pem)
        self.save_record(record)

    # --------------------------------------------------------------- renewal

    def stage(self, key: PrivateKey, certificate_pem: str, record: ProvisioningRecord) -> None:
        """Write a renewed set beside the current one; the record goes last (complete)."""
        self.discard_staged()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        data = certificate_pem.encode()
        x509.load_pem_x509_certificate(data)  # never store something unusable
        write_atomic(self.staged_path(self.key_path), pem, 0o600)
        write_atomic(self.staged_path(self.cert_path), data, 0o644)
        write_atomic(self.staged_path(self.record_path), record.to_json(), 0o644)

    def staged(self) -> Provisioned | None:
        """The staged set if it is complete and consistent; an inconsistent one is discarded
        (it can only be damage: a crash leaves no record.next behind a partial set)."""
        record_path = self.staged_path(self.record_path)
        if not record_path.exists():
            return None
        try:
            record = ProvisioningRecord.from_json(record_path.read_bytes())
            certificate = x509.load_pem_x509_certificate(
                self.staged_path(self.cert_path).read_bytes()
            )
            key = self._load_key_file(self.staged_path(self.key_path))
        except (OSError, ValueError, KeyError, TypeError, KeystoreError):
            self.discard_staged()
            return None
        if not same_public_key(key, certificate) or certificate_id(certificate) != (
            record.certificate_id
        ):
            self.discard_staged()
            return None
        return Provisioned(
            record, self.staged_path(self.key_path), self.staged_path(self.cert_path)
        )

    def discard_staged(self) -> None:
        """Forget a staged set (the record first: what remains is plainly incomplete)."""
        for path in reversed(self._credential_paths):
            remove_durably(self.staged_path(path))

    def commit_staged(self) -> Provisioned:
        """Make the staged set (proven by a connection) the current one, crash-safely."""
        if self.staged() is None:
            raise KeystoreError(f"no complete renewed credentials staged in {self.root}")
        write_atomic(self.root / COMMIT_MARKER, b"", 0o600)
        self._switch_to_staged()
        provisioned = self.provisioned()
        assert provisioned is not None
        return provisioned

    def _switch_to_staged(self) -> None:
        # Idempotent: after a crash half-way, the files already moved are simply skipped.
        for path in self._credential_paths:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.staged_path(path), path)
        fsync_folder(self.root)
        remove_durably(self.root / COMMIT_MARKER)

    # ----------------------------------------------------------------- reads

    def load_key(self) -> PrivateKey:
        """The device key; refused if group or others may read it."""
        return self._load_key_file(self.key_path)

    @staticmethod
    def _load_key_file(path: Path) -> PrivateKey:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeystoreError(f"no device key at {path}") from None
        except OSError as exc:
            raise KeystoreError(f"cannot read the device key {path}: {exc.strerror}") from None
        try:
            problem = key_mode_problem(path, os.fstat(fd).st_mode, what="device key")
            if problem is not None:
                raise KeystoreError(problem)
            with os.fdopen(fd, "rb", closefd=False) as stream:
                data = stream.read()
        finally:
            os.close(fd)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise KeystoreError(f"device key {path} is not an unencrypted PEM key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise KeystoreError(f"device key {path} is neither an EC nor an RSA key")
        return key

    def load_certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except FileNotFoundError:
            raise KeystoreError(f"no device certificate at {self.cert_path}") from None
        except ValueError:
            raise KeystoreError(f"{self.cert_path} is not a PEM certificate") from None

    @property
    def refusal_path(self) -> Path:
        return self.root / "refused.json"

    def record_refusal(self, certificate_id: str, reason: str) -> None:
        """The broker will not take this certificate again (revoked, expired): kept for
        ``fleet-agent status``, which shows it while the device still holds that certificate."""
        document = {"certificate_id": certificate_id, "reason": reason, "at": time.time()}
        write_atomic(self.refusal_path, json.dumps(document).encode(), 0o644)

    def refusal(self) -> dict[str, Any] | None:
        """The recorded refusal of the certificate the device holds now, if any."""
        try:
            document = json.loads(self.refusal_path.read_bytes())
            record = self.load_record()
        except (OSError, ValueError, KeystoreError):
            return None
        if not isinstance(document, dict) or record is None:
            return None
        return document if document.get("certificate_id") == record.certificate_id else None

    def load_record(self) -> ProvisioningRecord | None:
        try:
            data = self.record_path.read_bytes()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise KeystoreError(
                f"state folder {self.root} is not a folder: set agent.state_dir to a folder"
            ) from None
        except PermissionError:
            raise KeystoreError(
                f"cannot read {self.record_path}: permission denied; run as the agent's user, "
                f"or: chown -R $(id -u) {self.root}"
            ) from None
        try:
            return ProvisioningRecord.from_json(data)
        except (ValueError, KeyError, TypeError):
            raise KeystoreError(
                f"{self.record_path} is damaged; run provision again with --force"
            ) from None

    def provisioned(self) -> Provisioned | None:
        """The stored credentials if record, certificate and key are all present and agree.

        None if the device was never provisioned; KeystoreError if a set is present but
        inconsistent (the key does not match the certificate, ...)."""
        record = self.load_record()
        if record is None:
            return None
        certificate = self.load_certificate()
        key = self.load_key()
        if not same_public_key(key, certificate):
            raise KeystoreError(
                f"{self.key_path} does not match {self.cert_path}; run provision again with --force"
            )
        if certificate_id(certificate) != record.certificate_id:
            raise KeystoreError(
                f"{self.cert_path} is not certificate {record.certificate_id[:12]}… of "
                f"{self.record_path}; run provision again with --force"
            )
        return Provisioned(record, self.key_path, self.cert_path)
