"""The SQLite device registry, including what the C plugin's read-only queries see."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from broker.pki import CertificateAuthority, certificate_id, generate_private_key
from broker.registry import (
    SCHEMA,
    SCHEMA_VERSION,
    CertificateExists,
    CertificateRole,
    CertificateStatus,
    InvalidName,
    InvalidOwnershipToken,
    Registration,
    RegistryError,
    SQLiteRegistry,
    ThingStatus,
    UnknownCertificate,
    UnknownTarget,
    UnknownThing,
    validate_thing_name,
)

pytestmark = pytest.mark.unit

UTC = dt.timezone.utc
PLUGIN_CERT_QUERY = (
    "SELECT c.status, c.role, c.thing_name, c.awaiting_first_connect, t.status"
    " FROM certificates c LEFT JOIN things t ON t.name = c.thing_name WHERE c.id = ?1"
)
PLUGIN_SWEEP_QUERY = (
    "SELECT id FROM certificates WHERE updated_at > ?1 AND status IN ('INACTIVE', 'REVOKED')"
)
PLUGIN_THING_QUERY = "SELECT 1 FROM things WHERE name = ?1"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SQLiteRegistry]:
    with SQLiteRegistry.open(tmp_path / "registry" / "registry.db") as opened:
        yield opened


def new_cert(ca: CertificateAuthority, name: str = "device") -> x509.Certificate:
    key = generate_private_key()
    return ca.issue(key.public_key(), common_name=name, days=30, purpose="client")


def add_device(
    registry: SQLiteRegistry,
    ca: CertificateAuthority,
    thing: str | None = None,
    status: CertificateStatus = CertificateStatus.ACTIVE,
) -> str:
    record = registry.add_certificate(
        new_cert(ca), role=CertificateRole.DEVICE, status=status, thing_name=thing
    )
    return record.id


def test_schema_and_wal(registry: SQLiteRegistry, tmp_path: Path) -> None:
    db = sqlite3.connect(registry.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert {"meta", "things", "certificates", "ownership_tokens", "shadows"} <= tables
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)
    finally:
        db.close()


def test_reopen_keeps_data(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = tmp_path / "r.db"
    with SQLiteRegistry.open(path) as registry:
        registry.create_or_update_thing("t1")
        cert_id = add_device(registry, ca, "t1")
    with SQLiteRegistry.open(path) as registry:
        record = registry.get_certificate(cert_id)
        assert record is not None and record.thing_name == "t1"


def test_add_certificate_record(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    cert = new_cert(ca)
    record = registry.add_certificate(
        cert, role=CertificateRole.CLAIM, status=CertificateStatus.ACTIVE, label="shared claim"
    )
    assert record.id == certificate_id(cert)
    assert record.serial == format(cert.serial_number, "x")
    assert record.not_after == cert.not_valid_after_utc
    assert x509.load_pem_x509_certificate(record.pem.encode()) == cert
    assert registry.get_certificate(record.id) == record
    assert registry.get_certificate(record.id.upper()) == record
    assert registry.get_certificate("0" * 64) is None
    with pytest.raises(CertificateExists):
        registry.add_certificate(cert, role="claim", status="ACTIVE")  # type: ignore[arg-type]
    with pytest.raises(UnknownThing, match="no thing named 'ghost'"):
        add_device(registry, ca, "ghost")


def test_list_certificates_filters(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    registry.create_or_update_thing("t1")
    a = add_device(registry, ca, "t1")
    b = add_device(registry, ca, "t1", CertificateStatus.PENDING_ACTIVATION)
    registry.add_certificate(new_cert(ca), role=CertificateRole.CLAIM, status="ACTIVE")  # type: ignore[arg-type]
    assert {r.id for r in registry.list_certificates(thing_name="t1")} == {a, b}
    assert [
        r.id
        for r in registry.list_certificates(
            status=CertificateStatus.ACTIVE, role=CertificateRole.DEVICE
        )
    ] == [a]
    assert len(registry.list_certificates()) == 3


def test_status_transitions(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    cert_id = add_device(registry, ca, status=CertificateStatus.PENDING_ACTIVATION)
    for status in (CertificateStatus.ACTIVE, CertificateStatus.INACTIVE, CertificateStatus.ACTIVE):
        registry.set_certificate_status(cert_id, status)
        record = registry.get_certificate(cert_id)
        assert record is not None and record.status is status and record.revoked_at is None
    registry.set_certificate_status(cert_id, CertificateStatus.REVOKED)
    record = registry.get_certificate(cert_id)
    assert record is not None and record.status is CertificateStatus.REVOKED
    assert record.revoked_at is not None
    with pytest.raises(UnknownCertificate) as caught:
        registry.set_certificate_status("f" * 64, CertificateStatus.ACTIVE)
    assert str(caught.value) == f"no certificate with id {'f' * 64}"
    assert isinstance(caught.value, KeyError)
    with pytest.raises(ValueError):
        registry.set_certificate_status(cert_id, "BROKEN")  # type: ignore[arg-type]


def test_attach_and_delete(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    cert_id = add_device(registry, ca)
    with pytest.raises(UnknownThing):
        registry.attach_certificate(cert_id, "nobody")
    registry.create_or_update_thing("t1")
    registry.attach_certificate(cert_id, "t1")
    assert registry.list_certificates(thing_name="t1")[0].id == cert_id
    with pytest.raises(UnknownCertificate):
        registry.attach_certificate("a" * 64, "t1")
    # Deleting the thing detaches, not deletes, its certificates.
    assert registry.delete_thing("t1") is True
    assert registry.delete_thing("t1") is False
    record = registry.get_certificate(cert_id)
    assert record is not None and record.thing_name is None
    registry.delete_certificate(cert_id)
    assert registry.get_certificate(cert_id) is None
    with pytest.raises(UnknownCertificate):
        registry.delete_certificate(cert_id)


def test_things(registry: SQLiteRegistry) -> None:
    thing = registry.create_or_update_thing(
        "sensor:01", attributes={"site": "lab"}, thing_groups=["g1"], thing_type="sensor"
    )
    assert (thing.version, dict(thing.attributes), thing.thing_groups) == (
        1,
        {"site": "lab"},
        ("g1",),
    )
    updated = registry.create_or_update_thing("sensor:01", attributes={"site": "roof"})
    assert updated.version == 2
    assert dict(updated.attributes) == {"site": "roof"}
    assert updated.thing_groups == ("g1",) and updated.thing_type == "sensor"  # kept
    assert updated.created_at == thing.created_at
    assert registry.get_thing("sensor:01") == updated
    assert registry.get_thing("other") is None
    registry.create_or_update_thing("a-thing")
    assert [t.name for t in registry.list_things()] == ["a-thing", "sensor:01"]
    with pytest.raises(ValueError, match="strings to strings"):
        registry.create_or_update_thing("x", attributes={"n": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("name", ["", "bad name", "slash/name", "dollar$", "é", "x" * 129])
def test_thing_name_validation(registry: SQLiteRegistry, name: str) -> None:
    with pytest.raises(InvalidName, match="use 1-128 characters"):
        registry.create_or_update_thing(name)


def test_thing_name_of_128_characters_is_fine(registry: SQLiteRegistry) -> None:
    assert registry.create_or_update_thing("x" * 128).name == "x" * 128


def test_revoke_by_thing_name(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    registry.create_or_update_thing("t1")
    registry.create_or_update_thing("t2")
    ids = {add_device(registry, ca, "t1"), add_device(registry, ca, "t1")}
    other = add_device(registry, ca, "t2")
    revoked = registry.revoke("t1")
    assert {r.id for r in revoked} == ids
    assert all(r.status is CertificateStatus.REVOKED and r.revoked_at for r in revoked)
    untouched = registry.get_certificate(other)
    assert untouched is not None and untouched.status is CertificateStatus.ACTIVE
    serials = {serial for serial, _ in registry.revoked_certificates()}
    assert serials == {int(r.serial, 16) for r in revoked}

    # Revoking again keeps the first revocation time (the one the CRL published).
    again = registry.revoke("t1")
    assert {r.id: r.revoked_at for r in again} == {r.id: r.revoked_at for r in revoked}


def test_revoke_by_id_and_prefix(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    first = add_device(registry, ca)
    second = add_device(registry, ca)
    assert [r.id for r in registry.revoke(first.upper())] == [first]
    assert [r.id for r in registry.revoke(second[:8])] == [second]
    with pytest.raises(UnknownTarget):
        registry.revoke(second[:7])  # too short to be a prefix


def test_revoke_ambiguous_prefix(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    first = add_device(registry, ca)
    second = add_device(registry, ca)
    twin = first[:8] + ("0" if first[8] != "0" else "1") * 56
    with registry._lock:  # a real 8-hex collision would take ~65k certificates; forge one
        registry._db.execute("UPDATE certificates SET id = ? WHERE id = ?", (twin, second))
    with pytest.raises(UnknownTarget, match="matches several certificates; give more"):
        registry.revoke(first[:8])
    assert [r.id for r in registry.revoke(first[:9])] == [first]


def test_revoke_unknown_target(registry: SQLiteRegistry) -> None:
    registry.create_or_update_thing("lonely")
    with pytest.raises(UnknownTarget) as caught:
        registry.revoke("nothing-here")
    message = str(caught.value)
    assert message.startswith("'nothing-here' is neither a thing name nor a certificate id")
    assert "\n" not in message
    with pytest.raises(UnknownTarget):
        registry.revoke("ab" * 32)


def test_revoking_a_thing_without_certificates_still_revokes_the_thing(
    registry: SQLiteRegistry,
) -> None:
    # A registration in flight must not slip in after the revocation.
    registry.create_or_update_thing("lonely")
    assert registry.revoke("lonely", actor="ops") == []
    thing = registry.get_thing("lonely")
    assert thing is not None and thing.status is ThingStatus.REVOKED
    assert thing.revoked_by == "ops" and thing.revoked_at is not None


def test_ownership_token_single_use(
    registry: SQLiteRegistry, ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert_id = add_device(registry, ca, status=CertificateStatus.PENDING_ACTIVATION)
    token = "ownership-token-" + "Zq9" * 20
    registry.add_ownership_token(cert_id, token, dt.datetime.now(UTC) + dt.timedelta(hours=1))
    assert registry.consume_ownership_token(token) == cert_id
    with pytest.raises(InvalidOwnershipToken) as used:
        registry.consume_ownership_token(token)
    assert used.value.reason == "used"
    with pytest.raises(InvalidOwnershipToken) as unknown:
        registry.consume_ownership_token("never-issued")
    assert unknown.value.reason == "unknown"
    assert "never-issued" not in str(unknown.value)

    # The token itself is never stored: only its hash, in the db, WAL or anywhere beside them.
    registry.close()
    for path in registry.path.parent.iterdir():
        assert token.encode() not in path.read_bytes(), path


def test_issue_device_certificate_is_one_transaction(
    registry: SQLiteRegistry, ca: CertificateAuthority
) -> None:
    later = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    record = registry.issue_device_certificate(new_cert(ca, "issued"), "token-one", later)
    assert record.status is CertificateStatus.PENDING_ACTIVATION
    assert record.role is CertificateRole.DEVICE
    assert registry.peek_ownership_token("token-one").certificate_id == record.id

    # The token cannot be stored (already issued): the certificate is not kept either.
    second = new_cert(ca, "orphan")
    with pytest.raises(sqlite3.IntegrityError):
        registry.issue_device_certificate(second, "token-one", later)
    assert registry.get_certificate(certificate_id(second)) is None


def test_ownership_token_expired(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    cert_id = add_device(registry, ca, status=CertificateStatus.PENDING_ACTIVATION)
    now = dt.datetime.now(UTC)
    registry.add_ownership_token(cert_id, "t-expired", now - dt.timedelta(seconds=1))
    with pytest.raises(InvalidOwnershipToken) as expired:
        registry.consume_ownership_token("t-expired")
    assert expired.value.reason == "expired"
    registry.add_ownership_token(cert_id, "t-later", now + dt.timedelta(minutes=5))
    with pytest.raises(InvalidOwnershipToken, match="expired"):
        registry.consume_ownership_token("t-later", now=now + dt.timedelta(minutes=6))
    with pytest.raises(UnknownCertificate):
        registry.add_ownership_token("0" * 64, "t", now)
    with pytest.raises(ValueError, match="aware datetime"):
        registry.add_ownership_token(cert_id, "naive", dt.datetime(2030, 1, 1))


def test_purge_expired(registry: SQLiteRegistry, ca: CertificateAuthority) -> None:
    now = dt.datetime.now(UTC)
    hour = dt.timedelta(hours=1)
    stale = add_device(registry, ca, status=CertificateStatus.PENDING_ACTIVATION)
    registry.add_ownership_token(stale, "stale", now - hour)
    waiting = add_device(registry, ca, status=CertificateStatus.PENDING_ACTIVATION)
    registry.add_ownership_token(waiting, "waiting", now + hour)
    claimed = add_device(registry, ca, status=CertificateStatus.PENDING_ACTIVATION)
    registry.add_ownership_token(claimed, "claimed", now + hour)
    registry.consume_ownership_token("claimed")
    active = add_device(registry, ca)
    registry.add_ownership_token(active, "active", now - hour)
    no_token = add_device(registry, ca, status=CertificateStatus.PENDING_ACTIVATION)

    assert registry.purge_expired(now) == [stale]
    assert registry.get_certificate(stale) is None
    for kept in (waiting, claimed, active, no_token):
        assert registry.get_certificate(kept) is not None
    with pytest.raises(InvalidOwnershipToken) as gone:
        registry.consume_ownership_token("stale")
    assert gone.value.reason == "unknown"  # its token went with it (ON DELETE CASCADE)
    assert registry.purge_expired(now + 2 * hour) == [waiting]


def test_plugin_read_only_queries_during_a_write(
    registry: SQLiteRegistry, ca: CertificateAuthority
) -> None:
    registry.create_or_update_thing("t1")
    cert_id = add_device(registry, ca, "t1")
    reader = sqlite3.connect(f"file:{registry.path}?mode=ro", uri=True, timeout=0.1)
    try:
        with registry._lock:  # hold a write transaction open on the writer's connection
            registry._db.execute("BEGIN IMMEDIATE")
            registry._db.execute("UPDATE things SET version = version + 1 WHERE name = 't1'")
            try:
                row = reader.execute(PLUGIN_CERT_QUERY, (cert_id,)).fetchone()
                assert row == ("ACTIVE", "device", "t1", 0, "ACTIVE")
                assert reader.execute(PLUGIN_SWEEP_QUERY, (0,)).fetchall() == []
                assert reader.execute(PLUGIN_THING_QUERY, ("t1",)).fetchone() == (1,)
                assert reader.execute(PLUGIN_THING_QUERY, ("t2",)).fetchone() is None
            finally:
                registry._db.execute("ROLLBACK")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("DELETE FROM things")
    finally:
        reader.close()


def test_open_rejects_a_non_database(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="not a usable registry database"):
        SQLiteRegistry.open(path)


# ------------------------------------------------------------------- renewal


def register(
    registry: SQLiteRegistry, ca: CertificateAuthority, thing: str, renews: str | None
) -> str:
    """A certificate registered to ``thing`` through RegisterThing, as a renewal if ``renews``."""
    cert_id = add_device(registry, ca, status=CertificateStatus.PENDING_ACTIVATION)
    token = f"token-{cert_id[:16]}"
    registry.add_ownership_token(cert_id, token, dt.datetime.now(UTC) + dt.timedelta(hours=1))
    registry.complete_registration(
        Registration(token, cert_id, thing, CertificateStatus.ACTIVE, renews=renews)
    )
    return cert_id


def status_of(registry: SQLiteRegistry, cert_id: str) -> CertificateStatus:
    record = registry.get_certificate(cert_id)
    assert record is not None
    return record.status


def test_renewal_retires_the_old_certificate_once_the_new_one_connects(
    registry: SQLiteRegistry, ca: CertificateAuthority
) -> None:
    old = register(registry, ca, "t1", renews=None)
    new = register(registry, ca, "t1", renews=old)
    record = registry.get_certificate(new)
    assert record is not None and record.renewal_of == old
    # Until the new certificate has connected, both work: the device may still fall back.
    assert status_of(registry, old) is CertificateStatus.ACTIVE
    assert status_of(registry, new) is CertificateStatus.ACTIVE

    assert registry.certificate_connected(new) == [old]
    assert status_of(registry, old) is CertificateStatus.INACTIVE
    assert status_of(registry, new) is CertificateStatus.ACTIVE
    assert registry.certificate_connected(new) == []  # once only: later connects cost nothing
    assert registry.certificate_connected(old) == []  # an ordinary certificate: nothing to retire


def test_renewal_that_never_connected_is_retired_by_the_next_one(
    registry: SQLiteRegistry, ca: CertificateAuthority
) -> None:
    """A device asking again and again holds at most one renewal in waiting."""
    old = register(registry, ca, "t1", renews=None)
    abandoned = [register(registry, ca, "t1", renews=old) for _ in range(3)]
    latest = register(registry, ca, "t1", renews=old)
    for cert_id in abandoned:
        assert status_of(registry, cert_id) is CertificateStatus.INACTIVE
    assert status_of(registry, old) is CertificateStatus.ACTIVE
    assert status_of(registry, latest) is CertificateStatus.ACTIVE
    assert registry.certificate_connected(abandoned[0]) == []  # inactive: cannot retire anything
    assert registry.certificate_connected(latest) == [old]


def test_renewal_does_not_retire_a_revoked_certificate_twice(
    registry: SQLiteRegistry, ca: CertificateAuthority
) -> None:
    old = register(registry, ca, "t1", renews=None)
    new = register(registry, ca, "t1", renews=old)
    registry.set_certificate_status(old, CertificateStatus.REVOKED)
    assert registry.certificate_connected(new) == []
    assert status_of(registry, old) is CertificateStatus.REVOKED  # never downgraded


def test_schema_1_is_migrated_in_place(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = tmp_path / "registry.db"
    v1_schema = (
        SCHEMA.replace(
            "    revoked_at REAL,\n    renewal_of TEXT,\n"
            "    awaiting_first_connect INTEGER NOT NULL DEFAULT 0,\n    registered_by TEXT\n",
            "    revoked_at REAL\n",
        )
        .replace(
            "    updated_at REAL NOT NULL,\n    status TEXT NOT NULL DEFAULT 'ACTIVE'"
            " CHECK (status IN ('ACTIVE', 'REVOKED')),\n    revoked_at REAL,\n"
            "    revoked_by TEXT\n",
            "    updated_at REAL NOT NULL\n",
        )
        .replace("    used_at REAL,\n    requested_by TEXT\n", "    used_at REAL\n")
        .replace(
            "CREATE INDEX IF NOT EXISTS certificates_updated_at ON certificates(updated_at);\n",
            "",
        )
    )
    v1_schema = v1_schema[: v1_schema.index("CREATE TABLE IF NOT EXISTS audit_log")]
    for newer in ("renewal_of", "registered_by", "requested_by", "revoked_by", "audit_log"):
        assert newer not in v1_schema
    db = sqlite3.connect(path)
    db.executescript(v1_schema)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO things (name, created_at, updated_at) VALUES ('t1', 0, 0)")
    cert = new_cert(ca)
    db.execute(
        "INSERT INTO certificates (id, pem, serial, role, status, thing_name, not_after,"
        " created_at, updated_at) VALUES (?, 'pem', '1', 'device', 'ACTIVE', 't1', 0, 0, 0)",
        (certificate_id(cert),),
    )
    db.commit()
    db.close()

    with SQLiteRegistry.open(path) as migrated:
        record = migrated.get_certificate(certificate_id(cert))
        assert record is not None and record.status is CertificateStatus.ACTIVE
        assert record.renewal_of is None
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
        assert db.execute(PLUGIN_CERT_QUERY, (certificate_id(cert),)).fetchone() == (
            "ACTIVE",
            "device",
            "t1",
            0,
            "ACTIVE",
        )
        assert db.execute(PLUGIN_SWEEP_QUERY, (-1,)).fetchall() == []
    finally:
        db.close()


@pytest.mark.parametrize("name", ["pump-7\n", "", "x" * 129, "a b", "a/b"])
def test_a_name_outside_the_rules_is_refused_trailing_newline_included(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_thing_name(name)
