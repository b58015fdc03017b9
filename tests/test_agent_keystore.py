"""The device state folder: modes from the first byte, atomic replacement, refusing a key
others can read, and nothing secret but the key on disk."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent import durable
from agent import keystore as ks
from agent.keystore import Keystore, KeystoreError, ProvisioningRecord
from broker.pki import CertificateAuthority, certificate_pem
from tests.fleet import make_workdir

pytestmark = pytest.mark.unit


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def store() -> Keystore:
    return Keystore(make_workdir() / "state")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: modes must not depend on it."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def self_signed(key: ks.PrivateKey) -> str:
    ca = CertificateAuthority.create(days=1)
    cert = ca.issue(key.public_key(), common_name="device", days=1, purpose="client")
    return certificate_pem(cert).decode()


def record_for(pem: str, thing: str = "thing-1") -> ProvisioningRecord:
    certificate = x509.load_pem_x509_certificate(pem.encode())
    return ProvisioningRecord.now(thing, ks.certificate_id(certificate), "localhost", 8883)


# ------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    ("key_type", "kind", "size"),
    [
        ("ec-p256", ec.EllipticCurvePrivateKey, 256),
        ("ec-p384", ec.EllipticCurvePrivateKey, 384),
        ("rsa-2048", rsa.RSAPrivateKey, 2048),
    ],
)
def test_generate_key_types(key_type: ks.KeyType, kind: type, size: int) -> None:
    key = ks.generate_key(key_type)
    assert isinstance(key, kind) and key.key_size == size


def test_default_key_is_p256() -> None:
    key = ks.generate_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


def test_unknown_key_type_is_refused() -> None:
    with pytest.raises(ValueError, match="ec-p256, ec-p384, rsa-2048"):
        ks.generate_key("dsa-1024")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- modes


def test_folder_is_created_0700_whatever_the_umask(store: Keystore, open_umask: None) -> None:
    store.ensure()
    assert mode(store.root) == 0o700


def test_a_loose_existing_folder_is_tightened(store: Keystore) -> None:
    store.root.mkdir()
    store.root.chmod(0o755)
    store.ensure()
    assert mode(store.root) == 0o700


def test_key_is_0600_from_the_first_byte(
    store: Keystore, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.ensure()
    seen: list[int] = []
    real_write = os.write

    def spying_write(fd: int, data: bytes | memoryview) -> int:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(ks.os, "write", spying_write)
    store.save_key(ks.generate_key())
    monkeypatch.undo()
    assert seen and all(m == 0o600 for m in seen)
    assert mode(store.key_path) == 0o600
    assert isinstance(store.load_key(), ec.EllipticCurvePrivateKey)


def test_certificate_and_record_are_written_whole(store: Keystore, open_umask: None) -> None:
    key = ks.generate_key()
    pem = self_signed(key)
    store.save_credentials(key, pem, record_for(pem))
    assert mode(store.key_path) == 0o600
    assert mode(store.cert_path) == 0o644 and mode(store.record_path) == 0o644
    provisioned = store.provisioned()
    assert provisioned is not None and provisioned.record.thing_name == "thing-1"
    assert json.loads(store.record_path.read_text())["port"] == 8883
    assert sorted(p.name for p in store.root.iterdir()) == sorted(
        [ks.KEY_FILE, ks.CERT_FILE, ks.RECORD_FILE]
    )


# ------------------------------------------------------------------------ atomicity


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    store: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.ensure()
    old = ks.generate_key()
    store.save_key(old)
    before = store.key_path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ks.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        store.save_key(ks.generate_key())
    monkeypatch.undo()
    assert store.key_path.read_bytes() == before
    assert [p.name for p in store.root.iterdir()] == [ks.KEY_FILE]


def test_leftovers_of_a_crash_are_removed(store: Keystore) -> None:
    store.ensure()
    leftover = store.root / ".tmp-device.key.abcdef"
    leftover.write_bytes(b"half a key")
    store.ensure()
    assert not leftover.exists()


def test_write_atomic_replaces_and_never_writes_through_a_symlink(store: Keystore) -> None:
    """rename() replaces the link itself: a link planted at the name redirects nothing."""
    store.ensure()
    elsewhere = store.root.parent / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    target = store.root / "x"
    target.symlink_to(elsewhere)
    durable.write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and not target.is_symlink()
    assert elsewhere.read_bytes() == b"untouched"


# --------------------------------------------------------------------- refusing keys


def test_load_key_refuses_a_key_others_can_read(store: Keystore) -> None:
    store.ensure()
    store.save_key(ks.generate_key())
    store.key_path.chmod(0o644)
    with pytest.raises(KeystoreError) as raised:
        store.load_key()
    assert f"chmod 600 {store.key_path}" in str(raised.value)
    assert "BEGIN" not in str(raised.value)


def test_load_key_refuses_group_readable_too(store: Keystore) -> None:
    store.ensure()
    store.save_key(ks.generate_key())
    store.key_path.chmod(0o640)
    with pytest.raises(KeystoreError, match="chmod 600"):
        store.load_key()


def test_device_and_claim_keys_are_refused_by_one_check(store: Keystore) -> None:
    from agent.config import claim_file_problems

    store.ensure()
    store.save_key(ks.generate_key())
    store.key_path.chmod(0o644)
    with pytest.raises(KeystoreError) as raised:
        store.load_key()
    assert str(raised.value) == (
        f"device key {store.key_path} is mode 644, readable by others; "
        f"run: chmod 600 {store.key_path}"
    )
    # The claim key, checked with the config, is refused in the same words.
    claim_cert = store.root / "claim.pem"
    claim_cert.write_text("x")
    [problem] = claim_file_problems(Path("agent.toml"), claim_cert, store.key_path)
    assert problem == "agent.toml: claim.key: " + str(raised.value).replace(
        "device key", "claim key"
    )
    store.key_path.chmod(0o600)
    # Private now: what is left is that "x" is no certificate for this key.
    [problem] = claim_file_problems(Path("agent.toml"), claim_cert, store.key_path)
    assert "mode" not in problem and "not a PEM certificate" in problem
    assert ks.key_mode_problem(store.key_path, 0o100600, what="claim key") is None


def test_missing_and_garbage_keys_have_clear_errors(store: Keystore) -> None:
    store.ensure()
    with pytest.raises(KeystoreError, match="no device key"):
        store.load_key()
    durable.write_atomic(store.key_path, b"not a key")
    with pytest.raises(KeystoreError, match="not an unencrypted PEM key") as raised:
        store.load_key()
    assert "not a key" not in str(raised.value)


def test_never_provisioned_is_none(store: Keystore) -> None:
    assert store.provisioned() is None


def test_a_key_that_does_not_match_the_certificate_is_detected(store: Keystore) -> None:
    key = ks.generate_key()
    pem = self_signed(key)
    store.save_credentials(key, pem, record_for(pem))
    store.save_key(ks.generate_key())
    with pytest.raises(KeystoreError, match="does not match"):
        store.provisioned()


def test_a_record_for_another_certificate_is_detected(store: Keystore) -> None:
    key = ks.generate_key()
    pem = self_signed(key)
    store.save_credentials(key, pem, record_for(self_signed(key)))
    with pytest.raises(KeystoreError, match="is not certificate"):
        store.provisioned()


def test_a_damaged_record_is_reported(store: Keystore) -> None:
    store.ensure()
    durable.write_atomic(store.record_path, b"{", 0o644)
    with pytest.raises(KeystoreError, match="damaged"):
        store.provisioned()


# ------------------------------------------------------------------------ no secrets


def test_the_record_holds_no_secret_fields(store: Keystore) -> None:
    key = ks.generate_key()
    pem = self_signed(key)
    store.save_credentials(key, pem, record_for(pem))
    document = json.loads(store.record_path.read_text())
    assert set(document) == {"thing_name", "certificate_id", "endpoint", "port", "provisioned_at"}
    assert not any("token" in name.lower() for name in document)


# --------------------------------------------------------------------------- renewal


def provisioned_pair(store: Keystore) -> tuple[str, str]:
    """A current set and a staged one; their certificate ids."""
    old_key, new_key = ks.generate_key(), ks.generate_key()
    old_pem, new_pem = self_signed(old_key), self_signed(new_key)
    store.save_credentials(old_key, old_pem, record_for(old_pem))
    store.stage(new_key, new_pem, record_for(new_pem))
    return record_for(old_pem).certificate_id, record_for(new_pem).certificate_id


def test_a_staged_set_sits_beside_the_current_one(store: Keystore, open_umask: None) -> None:
    old, new = provisioned_pair(store)
    current, staged = store.provisioned(), store.staged()
    assert current is not None and current.record.certificate_id == old
    assert staged is not None and staged.record.certificate_id == new
    assert mode(store.staged_path(store.key_path)) == 0o600
    assert staged.key_path.name == "device.key.next"


def test_commit_switches_and_discard_forgets(store: Keystore) -> None:
    old, new = provisioned_pair(store)
    store.discard_staged()
    assert store.staged() is None
    assert store.provisioned().record.certificate_id == old  # type: ignore[union-attr]
    assert not list(store.root.glob("*.next"))

    old, new = provisioned_pair(store)
    assert store.commit_staged().record.certificate_id == new
    assert store.staged() is None
    assert not list(store.root.glob("*.next")) and not (store.root / ks.COMMIT_MARKER).exists()
    assert mode(store.key_path) == 0o600
    with pytest.raises(KeystoreError, match="no complete renewed credentials"):
        store.commit_staged()


def test_an_incomplete_staging_is_dropped_on_start(store: Keystore) -> None:
    """Crash while staging: key and certificate written, the record (the marker) not."""
    old, _ = provisioned_pair(store)
    store.staged_path(store.record_path).unlink()
    store.ensure()
    assert not list(store.root.glob("*.next"))
    assert store.provisioned().record.certificate_id == old  # type: ignore[union-attr]


def test_a_complete_unproven_staging_survives_a_restart(store: Keystore) -> None:
    """Crash after staging, before the switch: the broker may already have seen the new
    certificate, so the set is kept for the agent to try first."""
    old, new = provisioned_pair(store)
    store.ensure()
    assert store.staged().record.certificate_id == new  # type: ignore[union-attr]
    assert store.provisioned().record.certificate_id == old  # type: ignore[union-attr]


@pytest.mark.parametrize("moved", [0, 1, 2, 3])
def test_a_switch_interrupted_after_any_rename_is_finished_on_start(
    store: Keystore, moved: int
) -> None:
    _, new = provisioned_pair(store)
    durable.write_atomic(store.root / ks.COMMIT_MARKER, b"", 0o600)
    for path in (store.key_path, store.cert_path, store.record_path)[:moved]:
        os.replace(store.staged_path(path), path)
    store.ensure()
    provisioned = store.provisioned()
    assert provisioned is not None and provisioned.record.certificate_id == new
    assert not list(store.root.glob("*.next")) and not (store.root / ks.COMMIT_MARKER).exists()


def test_a_damaged_staging_is_discarded(store: Keystore) -> None:
    old, _ = provisioned_pair(store)
    store.staged_path(store.cert_path).write_text("not a certificate")
    assert store.staged() is None
    assert not list(store.root.glob("*.next"))
    assert store.provisioned().record.certificate_id == old  # type: ignore[union-attr]

    provisioned_pair(store)
    other = self_signed(ks.generate_key())  # a certificate for another key
    store.staged_path(store.cert_path).write_text(other)
    assert store.staged() is None
