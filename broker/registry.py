"""Device registry: things, certificates, ownership tokens and shadows.

`Registry` is the small storage interface the services use; `SQLiteRegistry` is the embedded
default (one file, WAL). The C plugin opens the same database read-only and runs exactly

    SELECT c.status, c.role, c.thing_name, c.awaiting_first_connect, t.status
        FROM certificates c LEFT JOIN things t ON t.name = c.thing_name WHERE c.id = ?1
    SELECT 1 FROM things WHERE name = ?1

    SELECT id FROM certificates WHERE updated_at > ?1 AND status IN ('INACTIVE', 'REVOKED')

so those table and column names are part of the contract with broker/plugin/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

from cryptography import x509

from agent import wire
from broker.pki import certificate_id, certificate_pem

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS things (
    name TEXT PRIMARY KEY,
    attributes TEXT NOT NULL DEFAULT '{}',
    thing_groups TEXT NOT NULL DEFAULT '[]',
    thing_type TEXT,
    version INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'REVOKED')),
    revoked_at REAL,
    revoked_by TEXT
);
CREATE TABLE IF NOT EXISTS certificates (
    id TEXT PRIMARY KEY,
    pem TEXT NOT NULL,
    serial TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('device', 'claim', 'service')),
    status TEXT NOT NULL
        CHECK (status IN ('PENDING_ACTIVATION', 'ACTIVE', 'INACTIVE', 'REVOKED')),
    thing_name TEXT REFERENCES things(name) ON DELETE SET NULL,
    label TEXT,
    not_after REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    revoked_at REAL,
    renewal_of TEXT,
    awaiting_first_connect INTEGER NOT NULL DEFAULT 0,
    registered_by TEXT
);
CREATE INDEX IF NOT EXISTS certificates_thing_name ON certificates(thing_name);
CREATE INDEX IF NOT EXISTS certificates_updated_at ON certificates(updated_at);
CREATE TABLE IF NOT EXISTS ownership_tokens (
    token_hash TEXT PRIMARY KEY,
    certificate_id TEXT NOT NULL REFERENCES certificates(id) ON DELETE CASCADE,
    expires_at REAL NOT NULL,
    used_at REAL,
    requested_by TEXT
);
CREATE INDEX IF NOT EXISTS ownership_tokens_certificate_id
    ON ownership_tokens(certificate_id);
CREATE TABLE IF NOT EXISTS policy_attachments (
    certificate_id TEXT NOT NULL REFERENCES certificates(id) ON DELETE CASCADE,
    policy_name TEXT NOT NULL,
    policy_document TEXT,
    PRIMARY KEY (certificate_id, policy_name)
);
CREATE TABLE IF NOT EXISTS shadows (
    thing_name TEXT NOT NULL,
    shadow_name TEXT NOT NULL DEFAULT '',
    document TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    deleted_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (thing_name, shadow_name)
);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""

# Schema 1 -> 2: the certificate a renewal replaces, and whether a registered certificate has
# connected yet (until it has, the device may not have it: a crash may have lost its key).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE certificates ADD COLUMN renewal_of TEXT",
        "ALTER TABLE certificates ADD COLUMN awaiting_first_connect INTEGER NOT NULL DEFAULT 0",
    ),
    # 2 -> 3: revocation recorded on the thing (who, when) and an audit log of operator
    # actions; which certificate registered a certificate (its claim) and asked for a token,
    # so a pending registration and a token are bound to the identity that made them; the
    # index the plugin's revocation sweep reads.
    2: (
        "ALTER TABLE things ADD COLUMN status TEXT NOT NULL DEFAULT 'ACTIVE'"
        " CHECK (status IN ('ACTIVE', 'REVOKED'))",
        "ALTER TABLE things ADD COLUMN revoked_at REAL",
        "ALTER TABLE things ADD COLUMN revoked_by TEXT",
        "ALTER TABLE certificates ADD COLUMN registered_by TEXT",
        "ALTER TABLE ownership_tokens ADD COLUMN requested_by TEXT",
        "CREATE INDEX IF NOT EXISTS certificates_updated_at ON certificates(updated_at)",
    ),
}

CERTIFICATE_ID = re.compile(r"[0-9a-f]{64}")
CERTIFICATE_ID_PREFIX = re.compile(r"[0-9a-f]{8,63}")


class CertificateRole(str, Enum):
    DEVICE = "device"
    CLAIM = "claim"
    SERVICE = "service"


class ThingStatus(str, Enum):
    ACTIVE = "ACTIVE"
    #: Revoked by an operator: no certificate may be registered for it until re-enabled.
    REVOKED = "REVOKED"


class CertificateStatus(str, Enum):
    PENDING_ACTIVATION = "PENDING_ACTIVATION"
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    REVOKED = "REVOKED"


# --- errors: one-line messages that never carry a secret


class _PlainKeyError(KeyError):
    # KeyError's str() quotes its argument; these are messages, not keys.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownCertificate(_PlainKeyError):
    pass


class UnknownThing(_PlainKeyError):
    pass


class UnknownTarget(LookupError):
    pass


class InvalidName(ValueError):
    pass


class CertificateExists(ValueError):
    pass


class ThingRevoked(Exception):
    """RegisterThing for a thing an operator revoked."""

    def __init__(self, thing: str) -> None:
        super().__init__(
            f"Thing {thing} is revoked; an operator must re-enable it first "
            f"(fleet-broker things enable {thing})."
        )
        self.thing = thing


class SharedClaim(ValueError):
    """Revoking a thing's claim would cut off other things' onboarding too."""


class RegistryError(sqlite3.DatabaseError):
    """The database cannot be used (wrong schema version, not SQLite, ...)."""


TokenRejection = Literal["unknown", "used", "expired"]


class InvalidOwnershipToken(Exception):
    _MESSAGES: Mapping[str, str] = {
        "unknown": "the ownership token is unknown",
        "used": "the ownership token has already been used",
        "expired": "the ownership token has expired",
    }

    def __init__(self, reason: TokenRejection) -> None:
        super().__init__(self._MESSAGES[reason])
        self.reason: TokenRejection = reason


# --- records


@dataclass(frozen=True)
class StoredShadow:
    """A shadow row: its JSON document, or None for a deleted shadow (a tombstone)."""

    document: str | None
    version: int
    deleted_at: float | None


@dataclass(frozen=True)
class Registration:
    """What a successful RegisterThing writes (see SQLiteRegistry.complete_registration)."""

    token: str = field(repr=False)  # a secret: never in a repr or a log line
    certificate_id: str
    thing_name: str
    certificate_status: CertificateStatus
    attributes: Mapping[str, str] | None = None
    thing_groups: Sequence[str] | None = None
    thing_type: str | None = None
    policies: Sequence[tuple[str, str | None]] = ()
    #: A renewal: the certificate of the thing's own device that asked, retired (INACTIVE)
    #: once the new certificate first connects.
    renews: str | None = None
    #: Certificates of the thing that never connected (an onboarding interrupted before the
    #: device stored its credentials): made INACTIVE by this registration.
    supersedes: Sequence[str] = ()
    #: The certificate that made this registration (a claim, or the thing's own for a renewal).
    registered_by: str | None = None


@dataclass(frozen=True)
class Thing:
    name: str
    attributes: Mapping[str, str]
    thing_groups: tuple[str, ...]
    thing_type: str | None
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    status: ThingStatus = ThingStatus.ACTIVE
    revoked_at: dt.datetime | None = None
    revoked_by: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: str


@dataclass(frozen=True)
class TokenGrant:
    """What a valid ownership token stands for: its certificate, and who asked for it."""

    certificate_id: str
    requested_by: str | None


@dataclass(frozen=True)
class CertificateRecord:
    id: str
    pem: str = field(repr=False)
    serial: str
    role: CertificateRole
    status: CertificateStatus
    thing_name: str | None
    label: str | None
    not_after: dt.datetime
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    renewal_of: str | None = None
    awaiting_first_connect: bool = False
    registered_by: str | None = None


def validate_thing_name(name: str) -> str:
    if not isinstance(name, str) or not wire.THING_NAME_PATTERN.fullmatch(name):
        raise InvalidName(
            f"thing name {name!r} is invalid; use 1-128 characters from a-z A-Z 0-9 : _ -"
        )
    return name


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _timestamp(moment: dt.datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("give an aware datetime (UTC); a naive one would be read as local time")
    return moment.timestamp()


def _datetime(timestamp: float | None) -> dt.datetime | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


# --- interface


class ShadowStore(Protocol):
    """Shadow reads and writes inside one open transaction: a read sees the earlier writes."""

    def load(self, thing_name: str, shadow_name: str) -> StoredShadow | None: ...

    def save(self, thing_name: str, shadow_name: str, document: str, version: int) -> None: ...

    def delete(self, thing_name: str, shadow_name: str, version: int) -> None: ...


class Registry(Protocol):
    def close(self) -> None: ...

    def add_certificate(
        self,
        cert: x509.Certificate,
        *,
        role: CertificateRole,
        status: CertificateStatus,
        thing_name: str | None = None,
        label: str | None = None,
    ) -> CertificateRecord: ...

    def add_certificates(
        self,
        certs: Sequence[x509.Certificate],
        *,
        role: CertificateRole,
        status: CertificateStatus,
        label: str | None = None,
    ) -> list[CertificateRecord]: ...

    def get_certificate(self, cert_id: str) -> CertificateRecord | None: ...

    def list_certificates(
        self,
        *,
        role: CertificateRole | None = None,
        thing_name: str | None = None,
        status: CertificateStatus | None = None,
    ) -> list[CertificateRecord]: ...

    def set_certificate_status(self, cert_id: str, status: CertificateStatus) -> None: ...

    def attach_certificate(self, cert_id: str, thing_name: str) -> None: ...

    def delete_certificate(self, cert_id: str) -> None: ...

    def create_or_update_thing(
        self,
        name: str,
        *,
        attributes: Mapping[str, str] | None = None,
        thing_groups: Sequence[str] | None = None,
        thing_type: str | None = None,
    ) -> Thing: ...

    def get_thing(self, name: str) -> Thing | None: ...

    def list_things(self) -> list[Thing]: ...

    def delete_thing(self, name: str) -> bool: ...

    def revoke(
        self, target: str, *, actor: str = "operator", with_claim: bool = False
    ) -> list[CertificateRecord]: ...

    def enable_thing(self, name: str, *, actor: str) -> Thing: ...

    def audit_log(self, limit: int = 100) -> list[AuditEntry]: ...

    def not_active(self, certificate_ids: Iterable[str]) -> set[str]: ...

    def revoked_certificates(self) -> list[tuple[int, dt.datetime]]: ...

    def add_ownership_token(
        self, certificate_id: str, token: str, expires_at: dt.datetime
    ) -> None: ...

    def issue_device_certificate(
        self,
        cert: x509.Certificate,
        token: str,
        expires_at: dt.datetime,
        *,
        requested_by: str | None = None,
    ) -> CertificateRecord: ...

    def consume_ownership_token(self, token: str, *, now: dt.datetime | None = None) -> str: ...

    def peek_ownership_token(self, token: str, *, now: dt.datetime | None = None) -> TokenGrant: ...

    def complete_registration(self, registration: Registration) -> Thing: ...

    def certificate_connected(self, certificate_id: str) -> list[str]: ...

    def load_shadow(self, thing_name: str, shadow_name: str) -> StoredShadow | None: ...

    def save_shadow(
        self, thing_name: str, shadow_name: str, document: str, version: int
    ) -> None: ...

    def delete_shadow(self, thing_name: str, shadow_name: str, version: int) -> None: ...

    def shadow_transaction(self) -> contextlib.AbstractContextManager[ShadowStore]: ...

    def purge_expired(self, now: dt.datetime) -> list[str]: ...


# --- SQLite


_CERT_COLUMNS = (
    "id, pem, serial, role, status, thing_name, label, not_after, created_at, revoked_at,"
    " renewal_of, awaiting_first_connect, registered_by"
)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older registry up to SCHEMA_VERSION, one step per transaction."""
    while True:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        steps = MIGRATIONS.get(int(row[0])) if row is not None else None
        if steps is None:
            return  # current, or newer than this program: the caller says which
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in steps:
                db.execute(statement)
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(int(row[0]) + 1),)
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _certificate_record(row: sqlite3.Row) -> CertificateRecord:
    return CertificateRecord(
        id=row["id"],
        pem=row["pem"],
        serial=row["serial"],
        role=CertificateRole(row["role"]),
        status=CertificateStatus(row["status"]),
        thing_name=row["thing_name"],
        label=row["label"],
        not_after=_utc(row["not_after"]),
        created_at=_utc(row["created_at"]),
        revoked_at=_datetime(row["revoked_at"]),
        renewal_of=row["renewal_of"],
        awaiting_first_connect=bool(row["awaiting_first_connect"]),
        registered_by=row["registered_by"],
    )


def _thing(row: sqlite3.Row) -> Thing:
    return Thing(
        name=row["name"],
        attributes=json.loads(row["attributes"]),
        thing_groups=tuple(json.loads(row["thing_groups"])),
        thing_type=row["thing_type"],
        version=row["version"],
        created_at=_utc(row["created_at"]),
        updated_at=_utc(row["updated_at"]),
        status=ThingStatus(row["status"]),
        revoked_at=_datetime(row["revoked_at"]),
        revoked_by=row["revoked_by"],
    )


def _check_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
        raise ValueError("thing attributes must map strings to strings")
    return dict(attributes)


def _check_groups(groups: Sequence[str]) -> list[str]:
    if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
        raise ValueError("thing groups must be a list of strings")
    return list(groups)


class _SQLiteShadows:
    """`ShadowStore` on a connection whose lock (and transaction, for writes) the caller holds."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def load(self, thing_name: str, shadow_name: str) -> StoredShadow | None:
        row = self._db.execute(
            "SELECT document, version, deleted_at FROM shadows"
            " WHERE thing_name = ? AND shadow_name = ?",
            (thing_name, shadow_name),
        ).fetchone()
        return None if row is None else StoredShadow(row[0], row[1], row[2])

    def save(self, thing_name: str, shadow_name: str, document: str, version: int) -> None:
        self._db.execute(
            "INSERT INTO shadows (thing_name, shadow_name, document, version, deleted_at,"
            " updated_at) VALUES (?, ?, ?, ?, NULL, ?)"
            " ON CONFLICT (thing_name, shadow_name) DO UPDATE SET document = excluded.document,"
            " version = excluded.version, deleted_at = NULL, updated_at = excluded.updated_at",
            (thing_name, shadow_name, document, version, time.time()),
        )

    def delete(self, thing_name: str, shadow_name: str, version: int) -> None:
        now = time.time()
        self._db.execute(
            "UPDATE shadows SET document = NULL, version = ?, deleted_at = ?, updated_at = ?"
            " WHERE thing_name = ? AND shadow_name = ?",
            (version, now, now, thing_name, shadow_name),
        )


class SQLiteRegistry:
    """The registry in one SQLite file (WAL, so the plugin's read-only lookups never block).

    One connection, guarded by a lock: safe to share between the threads of one process.
    Every method is its own transaction.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._lock = threading.Lock()
        self.path = path

    @classmethod
    def open(cls, path: Path, *, owner_uid: int | None = None) -> SQLiteRegistry:
        path = Path(path)
        # Only root can give files away; anyone else keeps them (and is the broker's user).
        owner = owner_uid if os.geteuid() == 0 else None
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
            os.chmod(path.parent, 0o700)  # mkdir's mode is narrowed by the umask
        if owner is not None:
            # The broker user must be able to create the -shm file next to the database.
            os.chown(path.parent, owner, -1)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) in _transaction().
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            if owner is not None:
                # Before the first PRAGMA: as root, SQLite gives -wal/-shm the database's owner.
                os.chown(path, owner, -1)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 5000")
            db.execute("PRAGMA foreign_keys = ON")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise RegistryError(f"{path}: cannot switch the registry to WAL mode ({mode})")
            existing = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if existing is not None:
                _migrate(db)
            db.executescript(SCHEMA)
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if int(version[0]) != SCHEMA_VERSION:
                raise RegistryError(
                    f"{path} has registry schema version {version[0]}, this program knows "
                    f"{SCHEMA_VERSION}; run a matching version of mqtt-fleet"
                )
        except RegistryError:
            db.close()
            raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise RegistryError(f"{path} is not a usable registry database ({exc})") from None
        except BaseException:
            db.close()
            raise
        if owner is not None:
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(f"{path}{suffix}", owner, -1)
        return cls(db, path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SQLiteRegistry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self, *, power_safe: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``power_safe=False`` skips the fsync at COMMIT (WAL with
        synchronous=NORMAL): the write still survives any crash of our processes and the
        database never corrupts, but an OS crash or power loss may undo the last commits.
        Shadows use it (an fsync per update capped throughput at ~1,000/s); certificates,
        tokens and revocations never do."""
        with self._lock:
            if not power_safe:
                self._db.execute("PRAGMA synchronous = NORMAL")
            try:
                # IMMEDIATE takes the write lock up front, so read-then-write steps cannot race.
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not power_safe:
                    self._db.execute("PRAGMA synchronous = FULL")

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # --- certificates

    def add_certificate(
        self,
        cert: x509.Certificate,
        *,
        role: CertificateRole,
        status: CertificateStatus,
        thing_name: str | None = None,
        label: str | None = None,
    ) -> CertificateRecord:
        with self._transaction() as db:
            return self._insert_certificate(db, cert, role, status, thing_name, label)

    def add_certificates(
        self,
        certs: Sequence[x509.Certificate],
        *,
        role: CertificateRole,
        status: CertificateStatus,
        label: str | None = None,
    ) -> list[CertificateRecord]:
        """Register many certificates in one transaction (one fsync, all or none)."""
        with self._transaction() as db:
            return [self._insert_certificate(db, c, role, status, None, label) for c in certs]

    def _insert_certificate(
        self,
        db: sqlite3.Connection,
        cert: x509.Certificate,
        role: CertificateRole,
        status: CertificateStatus,
        thing_name: str | None,
        label: str | None,
    ) -> CertificateRecord:
        role, status = CertificateRole(role), CertificateStatus(status)
        if thing_name is not None:
            validate_thing_name(thing_name)
        now = time.time()
        record = CertificateRecord(
            id=certificate_id(cert),
            pem=certificate_pem(cert).decode(),
            serial=format(cert.serial_number, "x"),
            role=role,
            status=status,
            thing_name=thing_name,
            label=label,
            not_after=cert.not_valid_after_utc,
            created_at=_utc(now),
            revoked_at=_utc(now) if status is CertificateStatus.REVOKED else None,
        )
        try:
            db.execute(
                f"INSERT INTO certificates ({_CERT_COLUMNS}, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.pem,
                    record.serial,
                    role.value,
                    status.value,
                    thing_name,
                    label,
                    record.not_after.timestamp(),
                    now,
                    now if record.revoked_at else None,
                    None,
                    0,
                    None,
                    now,
                ),
            )
        except sqlite3.IntegrityError:
            if self._certificate_row(db, record.id) is not None:
                raise CertificateExists(f"certificate {record.id} is already registered") from None
            raise UnknownThing(f"no thing named {thing_name!r}; create it first") from None
        return record

    @staticmethod
    def _certificate_row(db: sqlite3.Connection, cert_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = db.execute(  # the connection's row_factory is sqlite3.Row
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE id = ?", (cert_id.lower(),)
        ).fetchone()
        return row

    def get_certificate(self, cert_id: str) -> CertificateRecord | None:
        with self._lock:
            row = self._certificate_row(self._db, cert_id)
        return None if row is None else _certificate_record(row)

    def list_certificates(
        self,
        *,
        role: CertificateRole | None = None,
        thing_name: str | None = None,
        status: CertificateStatus | None = None,
    ) -> list[CertificateRecord]:
        conditions: list[str] = []
        params: list[object] = []
        if role is not None:
            conditions.append("role = ?")
            params.append(CertificateRole(role).value)
        if thing_name is not None:
            conditions.append("thing_name = ?")
            params.append(thing_name)
        if status is not None:
            conditions.append("status = ?")
            params.append(CertificateStatus(status).value)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._query(
            f"SELECT {_CERT_COLUMNS} FROM certificates{where} ORDER BY created_at, id", params
        )
        return [_certificate_record(row) for row in rows]

    def set_certificate_status(self, cert_id: str, status: CertificateStatus) -> None:
        status = CertificateStatus(status)
        now = time.time()
        with self._transaction() as db:
            if status is CertificateStatus.REVOKED:
                # Keep the first revocation time: it is what the CRL publishes.
                sql = (
                    "UPDATE certificates SET status = ?, updated_at = ?,"
                    " revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"
                )
                params: tuple[object, ...] = (status.value, now, now, cert_id.lower())
            else:
                sql = "UPDATE certificates SET status = ?, updated_at = ? WHERE id = ?"
                params = (status.value, now, cert_id.lower())
            if db.execute(sql, params).rowcount == 0:
                raise UnknownCertificate(f"no certificate with id {cert_id}")

    def attach_certificate(self, cert_id: str, thing_name: str) -> None:
        validate_thing_name(thing_name)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM things WHERE name = ?", (thing_name,)).fetchone() is None:
                raise UnknownThing(f"no thing named {thing_name!r}; create it first")
            updated = db.execute(
                "UPDATE certificates SET thing_name = ?, updated_at = ? WHERE id = ?",
                (thing_name, time.time(), cert_id.lower()),
            )
            if updated.rowcount == 0:
                raise UnknownCertificate(f"no certificate with id {cert_id}")

    def delete_certificate(self, cert_id: str) -> None:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM certificates WHERE id = ?", (cert_id.lower(),))
            if deleted.rowcount == 0:
                raise UnknownCertificate(f"no certificate with id {cert_id}")

    # --- things

    def create_or_update_thing(
        self,
        name: str,
        *,
        attributes: Mapping[str, str] | None = None,
        thing_groups: Sequence[str] | None = None,
        thing_type: str | None = None,
    ) -> Thing:
        """Create the thing, or replace the fields given (None keeps a field) and bump version."""
        validate_thing_name(name)
        attrs = None if attributes is None else json.dumps(_check_attributes(attributes))
        groups = None if thing_groups is None else json.dumps(_check_groups(thing_groups))
        now = time.time()
        with self._transaction() as db:
            self._upsert_thing(db, name, attrs, groups, thing_type, now)
            row = db.execute("SELECT * FROM things WHERE name = ?", (name,)).fetchone()
        return _thing(row)

    def get_thing(self, name: str) -> Thing | None:
        rows = self._query("SELECT * FROM things WHERE name = ?", (name,))
        return _thing(rows[0]) if rows else None

    def list_things(self) -> list[Thing]:
        return [_thing(row) for row in self._query("SELECT * FROM things ORDER BY name")]

    def delete_thing(self, name: str) -> bool:
        """Delete the thing (its certificates stay, detached). False if there was none."""
        with self._transaction() as db:
            return db.execute("DELETE FROM things WHERE name = ?", (name,)).rowcount > 0

    # --- revocation

    def revoke(
        self, target: str, *, actor: str = "operator", with_claim: bool = False
    ) -> list[CertificateRecord]:
        """Revoke a thing (its certificates, and the thing itself: REVOKED, so no certificate
        can be registered for it until `enable_thing`), or one certificate by id or unique id
        prefix (>= 8 hex). ``with_claim``: also revoke the claim certificate the thing
        onboarded with, unless that claim onboarded other things too (`SharedClaim`).

        A 64-hex id is taken as a certificate id first, then any other target as a thing name.
        All or nothing, and audited under ``actor``.
        """
        hex_target = target.lower()
        now = time.time()
        with self._transaction() as db:
            thing, ids = self._revocation_targets(db, target, hex_target)
            if with_claim:
                if thing is None:
                    raise UnknownTarget("--claim needs a thing name, not a certificate id")
                ids += [c for c in self._onboarding_claims(db, thing) if c not in ids]
            for cert_id in ids:
                db.execute(
                    "UPDATE certificates SET status = 'REVOKED', updated_at = ?,"
                    " revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                    (now, now, cert_id),
                )
            if thing is not None:
                db.execute(
                    "UPDATE things SET status = 'REVOKED', revoked_at = ?, revoked_by = ?,"
                    " updated_at = ? WHERE name = ?",
                    (now, actor, now, thing),
                )
            rows = [self._certificate_row(db, cert_id) for cert_id in ids]
            records = [_certificate_record(row) for row in rows if row is not None]
            self._audit(
                db,
                now,
                actor,
                "revoke-thing" if thing is not None else "revoke-certificate",
                thing or ids[0],
                ", ".join(f"{r.role.value} {r.id[:16]}" for r in records),
            )
        return records

    def _onboarding_claims(self, db: sqlite3.Connection, thing: str) -> list[str]:
        """The claim certificates that registered ``thing``'s certificates, if only it."""
        claims = [
            row["id"]
            for row in db.execute(
                "SELECT DISTINCT c.id FROM certificates c JOIN certificates d"
                " ON d.registered_by = c.id WHERE d.thing_name = ? AND c.role = 'claim'",
                (thing,),
            )
        ]
        if not claims:
            raise UnknownTarget(
                f"the registry does not say which claim certificate thing {thing!r} onboarded "
                "with (registered before this was recorded, or not by claim); revoke the claim "
                "by its id (fleet-broker certs lists them)"
            )
        for claim in claims:
            others = db.execute(
                "SELECT COUNT(DISTINCT thing_name) FROM certificates"
                " WHERE registered_by = ? AND thing_name IS NOT NULL AND thing_name != ?",
                (claim, thing),
            ).fetchone()[0]
            if others:
                raise SharedClaim(
                    f"claim certificate {claim[:16]}… also onboarded {others} other thing(s): "
                    f"revoking it would stop their onboarding too; revoke the thing alone, or "
                    f"the claim by its id (fleet-broker revoke {claim[:16]}) if that is meant"
                )
        return claims

    @staticmethod
    def _audit(
        db: sqlite3.Connection, at: float, actor: str, action: str, target: str, detail: str
    ) -> None:
        db.execute(
            "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (at, actor, action, target, detail),
        )

    def enable_thing(self, name: str, *, actor: str) -> Thing:
        """Let a revoked thing be registered again (its old certificates stay REVOKED)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT status FROM things WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownThing(f"no thing named {name!r}; list them with fleet-broker things")
            if row["status"] != ThingStatus.REVOKED.value:
                raise InvalidName(f"thing {name!r} is not revoked; nothing to enable")
            db.execute(
                "UPDATE things SET status = 'ACTIVE', revoked_at = NULL, revoked_by = NULL,"
                " updated_at = ? WHERE name = ?",
                (now, name),
            )
            self._audit(db, now, actor, "enable-thing", name, "")
            return _thing(db.execute("SELECT * FROM things WHERE name = ?", (name,)).fetchone())

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        rows = self._query(
            "SELECT at, actor, action, target, detail FROM audit_log ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            AuditEntry(_utc(r["at"]), r["actor"], r["action"], r["target"], r["detail"])
            for r in rows
        ]

    def not_active(self, certificate_ids: Iterable[str]) -> set[str]:
        """Those of ``certificate_ids`` that may not act now: unknown, not ACTIVE, or attached
        to a REVOKED thing. The services ask this of every request's stamp, so a revocation
        holds even where the broker's disconnect was lost."""
        wanted = {c.lower() for c in certificate_ids}
        if not wanted:
            return set()
        marks = ",".join("?" * len(wanted))
        rows = self._query(
            "SELECT c.id FROM certificates c LEFT JOIN things t ON t.name = c.thing_name"
            f" WHERE c.id IN ({marks}) AND c.status = 'ACTIVE'"
            " AND (t.status IS NULL OR t.status = 'ACTIVE')",
            tuple(wanted),
        )
        return wanted - {row["id"] for row in rows}

    @staticmethod
    def _revocation_targets(
        db: sqlite3.Connection, target: str, hex_target: str
    ) -> tuple[str | None, list[str]]:
        """(the thing, if the target is one; the certificate ids to revoke)."""
        is_full_id = CERTIFICATE_ID.fullmatch(hex_target) is not None
        if (
            is_full_id
            and db.execute("SELECT 1 FROM certificates WHERE id = ?", (hex_target,)).fetchone()
        ):
            return None, [hex_target]
        if db.execute("SELECT 1 FROM things WHERE name = ?", (target,)).fetchone():
            rows = db.execute(
                "SELECT id FROM certificates WHERE thing_name = ? ORDER BY created_at, id",
                (target,),
            ).fetchall()
            return target, [row["id"] for row in rows]
        if CERTIFICATE_ID_PREFIX.fullmatch(hex_target):
            rows = db.execute(
                "SELECT id FROM certificates WHERE substr(id, 1, ?) = ? LIMIT 2",
                (len(hex_target), hex_target),
            ).fetchall()
            if len(rows) == 1:
                return None, [rows[0]["id"]]
            if rows:
                raise UnknownTarget(
                    f"certificate id prefix {hex_target!r} matches several certificates; "
                    "give more characters"
                )
        raise UnknownTarget(
            f"{target!r} is neither a thing name nor a certificate id (or a unique prefix of at "
            "least 8 hex characters); list them with `fleet-broker things` or `fleet-broker certs`"
        )

    def revoked_certificates(self) -> list[tuple[int, dt.datetime]]:
        rows = self._query(
            "SELECT serial, COALESCE(revoked_at, updated_at) AS revoked_at FROM certificates"
            " WHERE status = 'REVOKED' ORDER BY revoked_at"
        )
        return [(int(row["serial"], 16), _utc(row["revoked_at"])) for row in rows]

    # --- ownership tokens (only their SHA-256 is stored)

    def add_ownership_token(self, certificate_id: str, token: str, expires_at: dt.datetime) -> None:
        with self._transaction() as db:
            if self._certificate_row(db, certificate_id) is None:
                raise UnknownCertificate(f"no certificate with id {certificate_id}")
            self._insert_token(db, certificate_id, token, expires_at)

    def issue_device_certificate(
        self,
        cert: x509.Certificate,
        token: str,
        expires_at: dt.datetime,
        *,
        requested_by: str | None = None,
    ) -> CertificateRecord:
        """A new device certificate (PENDING_ACTIVATION) and its ownership token, in one
        transaction: one fsync per CreateCertificateFromCsr, and never a certificate without
        its token. ``requested_by``: the certificate that asked; only it may use the token."""
        with self._transaction() as db:
            record = self._insert_certificate(
                db, cert, CertificateRole.DEVICE, CertificateStatus.PENDING_ACTIVATION, None, None
            )
            self._insert_token(db, record.id, token, expires_at, requested_by)
            return record

    @staticmethod
    def _insert_token(
        db: sqlite3.Connection,
        certificate_id: str,
        token: str,
        expires_at: dt.datetime,
        requested_by: str | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO ownership_tokens (token_hash, certificate_id, expires_at, requested_by)"
            " VALUES (?, ?, ?, ?)",
            (hash_token(token), certificate_id.lower(), _timestamp(expires_at), requested_by),
        )

    @staticmethod
    def _valid_token_row(db: sqlite3.Connection, token: str, moment: float) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute(
            "SELECT token_hash, certificate_id, expires_at, used_at, requested_by"
            " FROM ownership_tokens"
            " WHERE token_hash = ?",
            (hash_token(token),),
        ).fetchone()
        if row is None:
            raise InvalidOwnershipToken("unknown")
        if row["used_at"] is not None:
            raise InvalidOwnershipToken("used")
        if row["expires_at"] <= moment:
            raise InvalidOwnershipToken("expired")
        return row

    def peek_ownership_token(self, token: str, *, now: dt.datetime | None = None) -> TokenGrant:
        """What a valid token stands for, without using it up."""
        moment = time.time() if now is None else _timestamp(now)
        with self._lock:
            row = self._valid_token_row(self._db, token, moment)
        return TokenGrant(str(row["certificate_id"]), row["requested_by"])

    def consume_ownership_token(self, token: str, *, now: dt.datetime | None = None) -> str:
        """Mark the token used and return its certificate id; each token works once."""
        moment = time.time() if now is None else _timestamp(now)
        with self._transaction() as db:
            row = self._valid_token_row(db, token, moment)
            db.execute(
                "UPDATE ownership_tokens SET used_at = ? WHERE token_hash = ?",
                (moment, row["token_hash"]),
            )
            return str(row["certificate_id"])

    @staticmethod
    def _upsert_thing(
        db: sqlite3.Connection,
        name: str,
        attributes_json: str | None,
        groups_json: str | None,
        thing_type: str | None,
        now: float,
    ) -> None:
        """Create the thing, or replace the fields given (None keeps one) and bump its version."""
        db.execute(
            "INSERT INTO things"
            " (name, attributes, thing_groups, thing_type, version, created_at, updated_at)"
            " VALUES (?, COALESCE(?, '{}'), COALESCE(?, '[]'), ?, 1, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET"
            "  attributes = COALESCE(?, attributes),"
            "  thing_groups = COALESCE(?, thing_groups),"
            "  thing_type = COALESCE(?, thing_type),"
            "  version = version + 1,"
            "  updated_at = ?",
            (
                name,
                attributes_json,
                groups_json,
                thing_type,
                now,
                now,
                attributes_json,
                groups_json,
                thing_type,
                now,
            ),
        )

    def complete_registration(self, registration: Registration) -> Thing:
        """RegisterThing's effect, all or nothing: the token is used up, the thing created or
        updated, the certificate attached with its new status and its policies recorded."""
        r = registration
        validate_thing_name(r.thing_name)
        attrs = None if r.attributes is None else json.dumps(_check_attributes(r.attributes))
        groups = None if r.thing_groups is None else json.dumps(_check_groups(r.thing_groups))
        now = time.time()
        with self._transaction() as db:
            token_row = self._valid_token_row(db, r.token, now)
            if token_row["certificate_id"] != r.certificate_id:
                raise InvalidOwnershipToken("unknown")
            status = db.execute(
                "SELECT status FROM things WHERE name = ?", (r.thing_name,)
            ).fetchone()
            if status is not None and status["status"] == ThingStatus.REVOKED.value:
                raise ThingRevoked(r.thing_name)
            db.execute(
                "UPDATE ownership_tokens SET used_at = ? WHERE token_hash = ?",
                (now, token_row["token_hash"]),
            )
            self._upsert_thing(db, r.thing_name, attrs, groups, r.thing_type, now)
            db.execute(
                "UPDATE certificates SET thing_name = ?, status = ?, updated_at = ?,"
                " renewal_of = ?, awaiting_first_connect = ?, registered_by = ? WHERE id = ?",
                (
                    r.thing_name,
                    r.certificate_status.value,
                    now,
                    r.renews,
                    1,
                    r.registered_by,
                    r.certificate_id,
                ),
            )
            db.executemany(
                "UPDATE certificates SET status = 'INACTIVE', awaiting_first_connect = 0,"
                " updated_at = ? WHERE id = ? AND awaiting_first_connect = 1",
                [(now, orphan) for orphan in r.supersedes],
            )
            if r.renews:
                # An earlier renewal of the same certificate that never connected (its key was
                # lost in a crash, or a device asks again and again) is retired now: a thing
                # has at most its current certificate and one renewal in waiting.
                db.execute(
                    "UPDATE certificates SET status = 'INACTIVE', awaiting_first_connect = 0,"
                    " updated_at = ? WHERE renewal_of = ? AND awaiting_first_connect = 1"
                    " AND id != ? AND status = 'ACTIVE'",
                    (now, r.renews, r.certificate_id),
                )
            db.executemany(
                "INSERT OR REPLACE INTO policy_attachments"
                " (certificate_id, policy_name, policy_document) VALUES (?, ?, ?)",
                [(r.certificate_id, name, document) for name, document in r.policies],
            )
            row = db.execute("SELECT * FROM things WHERE name = ?", (r.thing_name,)).fetchone()
        return _thing(row)

    def certificate_connected(self, certificate_id: str) -> list[str]:
        """``certificate_id`` has connected for the first time: from now on it counts as in
        use; if it is a renewal, make the certificate it renews INACTIVE and return that id."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT renewal_of FROM certificates WHERE id = ? AND awaiting_first_connect = 1"
                " AND status = 'ACTIVE'",
                (certificate_id.lower(),),
            ).fetchone()
            if row is None:
                return []
            db.execute(
                "UPDATE certificates SET awaiting_first_connect = 0, updated_at = ? WHERE id = ?",
                (now, certificate_id.lower()),
            )
            if row["renewal_of"] is None:
                return []
            retired = db.execute(
                "UPDATE certificates SET status = 'INACTIVE', updated_at = ?"
                " WHERE id = ? AND status = 'ACTIVE'",
                (now, row["renewal_of"]),
            ).rowcount
            # Certificates of this thing retired before (earlier renewals, superseded
            # onboardings) are no use to anyone: keep the one just retired, drop the rest
            # once the broker's sweep has long seen them go (REVOKED ones stay: the CRL).
            db.execute(
                "DELETE FROM certificates WHERE status = 'INACTIVE' AND awaiting_first_connect = 0"
                " AND thing_name = (SELECT thing_name FROM certificates WHERE id = ?)"
                " AND id NOT IN (?, ?) AND updated_at < ?",
                (certificate_id.lower(), certificate_id.lower(), row["renewal_of"], now - 120),
            )
        return [row["renewal_of"]] if retired else []

    # --- shadows ('' is the classic shadow)

    def load_shadow(self, thing_name: str, shadow_name: str) -> StoredShadow | None:
        with self._lock:
            return _SQLiteShadows(self._db).load(thing_name, shadow_name)

    def save_shadow(self, thing_name: str, shadow_name: str, document: str, version: int) -> None:
        with self.shadow_transaction() as shadows:
            shadows.save(thing_name, shadow_name, document, version)

    def delete_shadow(self, thing_name: str, shadow_name: str, version: int) -> None:
        """Keep a tombstone: a shadow recreated soon after continues from ``version``."""
        with self.shadow_transaction() as shadows:
            shadows.delete(thing_name, shadow_name, version)

    @contextlib.contextmanager
    def shadow_transaction(self) -> Iterator[ShadowStore]:
        """One transaction for a batch of shadow requests: one commit (and one lock round)
        instead of one per update; it is committed when the block ends without an error."""
        with self._transaction(power_safe=False) as db:
            yield _SQLiteShadows(db)

    def purge_expired(self, now: dt.datetime) -> list[str]:
        """Delete PENDING_ACTIVATION certificates whose tokens all expired unused (AWS: 1 h)."""
        moment = _timestamp(now)
        with self._transaction() as db:
            rows = db.execute(
                "SELECT c.id FROM certificates c WHERE c.status = 'PENDING_ACTIVATION'"
                " AND EXISTS (SELECT 1 FROM ownership_tokens t WHERE t.certificate_id = c.id)"
                " AND NOT EXISTS (SELECT 1 FROM ownership_tokens t WHERE t.certificate_id = c.id"
                "  AND (t.used_at IS NOT NULL OR t.expires_at > ?))",
                (moment,),
            ).fetchall()
            ids = [row["id"] for row in rows]
            db.executemany("DELETE FROM certificates WHERE id = ?", [(i,) for i in ids])
        return ids
