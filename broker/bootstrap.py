"""What `fleet-broker init`, `issue-claim` and `revoke` do to the PKI folder and the registry.

No argument parsing and no printing here: the CLI wraps these and turns PkiError, InvalidName
and UnknownTarget into one-line messages.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from broker.pki import (
    CertificateAuthority,
    PkiError,
    PkiPaths,
    certificate_pem,
    generate_private_key,
    load_crl,
    utc_now,
    write_crl,
    write_private_key,
    write_public_file,
)
from broker.registry import (
    CertificateRecord,
    CertificateRole,
    CertificateStatus,
    InvalidName,
    SQLiteRegistry,
)
from broker.templates import write_default_template

BROKER_USER = "mosquitto"
CLAIM_BATCH_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_CLAIMS = 100_000
CRL_DAYS = 365
# One DNS label; a leading "*." is allowed for wildcard names.
DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

DEFAULT_BROKER_CONFIG = """\
# mqtt-fleet broker side. Paths are relative to this file's folder.
[broker]
port = 8883
bind_address = "0.0.0.0"
log_level = "notice"        # error | warning | notice | info | debug
max_open_files = 65536
run_dir = "run"

[certificates]
device_validity_days = 365
# device_validity_seconds = 600  # instead of days, 60-86400: short-lived, to watch renewal
min_renewal_interval_seconds = 60  # a device renews at most this often (or at half-life)

[services]
client_id = "fleet-services"

[provisioning]
templates_dir = "templates"  # <name>.json AWS provisioning templates, <name>.hook.json hooks
allow_create_keys_and_certificate = false  # keys made by the broker: off, use CSRs
ownership_token_lifetime_seconds = 3600

[limits]  # per device or claim connection, enforced by the broker plugin
requests_per_second = 100    # AWS: 100 publishes/s per connection; 0 turns the quota off
request_burst = 100          # beyond: a 429 on the request's rejected topic
flood_disconnect = 1000      # requests over the quota within 10 s before a disconnect; 0: never
"""


def broker_file_owner() -> int | None:
    """The uid that must own the broker's key and the registry, or None to keep our own.

    Mosquitto started as root drops to user `mosquitto` before it reads its key and opens the
    registry, so as root those files must belong to that user.
    """
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(BROKER_USER).pw_uid
    except KeyError:
        return None


def open_registry(paths: PkiPaths) -> SQLiteRegistry:
    return SQLiteRegistry.open(paths.registry, owner_uid=broker_file_owner())


def _split_hostnames(hostnames: Sequence[str]) -> tuple[list[str], list[str]]:
    """Sort names into (DNS names, IP addresses), refusing anything that is neither."""
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    for name in hostnames:
        try:
            ip_addresses.append(str(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        labels = name.removeprefix("*.").split(".")
        if len(name) > 253 or not all(DNS_LABEL.fullmatch(label) for label in labels):
            raise PkiError(
                f"hostname {name!r} is neither a DNS name nor an IP address; "
                "pass names like broker.example.com or 192.0.2.10"
            )
        dns_names.append(name.lower())
    return dns_names, ip_addresses


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _remove_pki(paths: PkiPaths) -> None:
    for path in (
        paths.ca_cert,
        paths.ca_key,
        paths.broker_cert,
        paths.broker_key,
        paths.claim_cert,
        paths.claim_key,
        paths.service_cert,
        paths.service_key,
        paths.crl,
    ):
        path.unlink(missing_ok=True)
    # Extra claims and registry records belong to the old CA: useless once it is gone.
    for folder in (paths.registry_dir, paths.claims_dir):
        if folder.exists():
            shutil.rmtree(folder)


def initialize(
    root: Path,
    *,
    hostnames: Sequence[str] = (),
    force: bool = False,
    ca_days: int = 3650,
    server_days: int = 825,
    client_days: int = 365,
) -> PkiPaths:
    """Create the CA, broker, claim and service credentials, an empty CRL and the registry."""
    paths = PkiPaths(Path(root))
    if paths.ca_key.exists() and not force:
        raise PkiError(
            f"{paths.root}/ already holds a PKI (ca.key); pass --force to replace it — "
            "every device certificate it issued will stop working"
        )
    # Check every input before --force deletes anything.
    extra_dns, extra_ips = _split_hostnames(hostnames)
    for days in (ca_days, server_days, client_days):
        if days < 1:
            raise PkiError(f"validity of {days} days is too short; give at least 1 day")
    if force:
        _remove_pki(paths)
    if not paths.root.exists():
        paths.root.mkdir(parents=True)
        os.chmod(paths.root, 0o755)  # the broker user must traverse it; mkdir obeys the umask
    owner = broker_file_owner()

    ca = CertificateAuthority.create(days=ca_days)
    write_public_file(paths.ca_cert, certificate_pem(ca.certificate))

    _issue_broker_certificate(
        paths,
        ca,
        _unique(["localhost", *extra_dns]),
        _unique(["127.0.0.1", "::1", *extra_ips]),
        days=server_days,
        owner=owner,
    )

    identities = {
        "claim": (paths.claim_cert, paths.claim_key, "mqtt-fleet claim"),
        "service": (paths.service_cert, paths.service_key, "mqtt-fleet service"),
    }
    certs: dict[str, x509.Certificate] = {}
    for role, (cert_path, key_path, common_name) in identities.items():
        key = generate_private_key()
        certs[role] = ca.issue(
            key.public_key(), common_name=common_name, days=client_days, purpose="client"
        )
        write_private_key(key_path, key)
        write_public_file(cert_path, certificate_pem(certs[role]))

    write_crl(paths, ca, ca.build_crl([], days=CRL_DAYS))
    with open_registry(paths) as registry:
        registry.add_certificate(
            certs["claim"],
            role=CertificateRole.CLAIM,
            status=CertificateStatus.ACTIVE,
            label="shared claim",
        )
        registry.add_certificate(
            certs["service"], role=CertificateRole.SERVICE, status=CertificateStatus.ACTIVE
        )
    if not paths.broker_config.exists():
        write_public_file(paths.broker_config, DEFAULT_BROKER_CONFIG.encode())
    write_default_template(paths.root / "templates")  # never overwrites an edited one
    # Last: ca.key marks a complete PKI, so an interrupted init can simply be run again.
    write_private_key(paths.ca_key, ca.private_key)
    return paths


def _claim_file_names(count: int) -> list[tuple[str, str]]:
    if count == 1:
        return [("claim.pem", "claim.key")]
    width = max(4, len(str(count)))  # names sort in issue order
    return [(f"claim-{i:0{width}d}.pem", f"claim-{i:0{width}d}.key") for i in range(1, count + 1)]


def issue_claims(
    root: Path, *, name: str, count: int = 1, days: int = 365
) -> list[tuple[Path, Path]]:
    """Mint `count` claim credentials into claims/<name>/ and register them (label = name)."""
    if not isinstance(name, str) or not CLAIM_BATCH_NAME.fullmatch(name):
        raise InvalidName(
            f"claim batch name {name!r} is invalid; use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CLAIMS:
        raise ValueError(f"claim count {count!r} is out of range; give 1 to {MAX_CLAIMS}")
    paths = PkiPaths(Path(root))
    ca = CertificateAuthority.load(paths)
    folder = paths.claims_dir / name
    if folder.exists():
        raise PkiError(f"{folder} already exists; choose another name or delete that folder")
    paths.claims_dir.mkdir(mode=0o700, exist_ok=True)
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)  # it holds private keys; mkdir obeys the umask
    try:
        written: list[tuple[Path, Path]] = []
        certs: list[x509.Certificate] = []
        for index, (cert_name, key_name) in enumerate(_claim_file_names(count), start=1):
            key = generate_private_key()
            common_name = f"mqtt-fleet claim {name}" + (f" {index}" if count > 1 else "")
            cert = ca.issue(key.public_key(), common_name=common_name, days=days, purpose="client")
            # One folder fsync at the end instead of one per file: batches reach 100,000.
            write_private_key(folder / key_name, key, sync_folder=False)
            write_public_file(folder / cert_name, certificate_pem(cert), sync_folder=False)
            certs.append(cert)
            written.append((folder / cert_name, folder / key_name))
        with open_registry(paths) as registry:
            registry.add_certificates(
                certs, role=CertificateRole.CLAIM, status=CertificateStatus.ACTIVE, label=name
            )
    except BaseException:
        # Nothing was registered; credentials the broker would refuse must not be left around.
        shutil.rmtree(folder, ignore_errors=True)
        raise
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _issue_broker_certificate(
    paths: PkiPaths,
    ca: CertificateAuthority,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    *,
    days: int,
    owner: int | None,
) -> None:
    key = generate_private_key()
    cert = ca.issue(
        key.public_key(),
        common_name="mqtt-fleet broker",
        days=days,
        purpose="server",
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )
    write_private_key(paths.broker_key, key, owner_uid=owner)
    write_public_file(paths.broker_cert, certificate_pem(cert))


def broker_certificate_names(root: Path) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses the broker certificate names."""
    cert = x509.load_pem_x509_certificate(PkiPaths(Path(root)).broker_cert.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (
        list(san.get_values_for_type(x509.DNSName)),
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
    )


def add_broker_names(root: Path, hostnames: Sequence[str], *, days: int = 825) -> list[str]:
    """Reissue the broker certificate with ``hostnames`` added to the names it has (a new key,
    the same CA): devices keep working, as they trust the CA, not this certificate. Returns
    every name it now carries; the broker uses it from its next start."""
    paths = PkiPaths(Path(root))
    ca = CertificateAuthority.load(paths)
    extra_dns, extra_ips = _split_hostnames(hostnames)
    dns, ips = broker_certificate_names(paths.root)
    dns, ips = _unique([*dns, *extra_dns]), _unique([*ips, *extra_ips])
    _issue_broker_certificate(paths, ca, dns, ips, days=days, owner=broker_file_owner())
    return [*dns, *ips]


def _rebuild_crl(paths: PkiPaths, ca: CertificateAuthority, registry: SQLiteRegistry) -> None:
    write_crl(paths, ca, ca.build_crl(registry.revoked_certificates(), days=CRL_DAYS))


def revoke(
    root: Path, target: str, *, actor: str = "operator", with_claim: bool = False
) -> list[CertificateRecord]:
    """Revoke a thing (and its certificates; with ``with_claim`` the claim it onboarded with)
    or one certificate, then publish a new CRL (see SQLiteRegistry.revoke).

    The caller then signals the broker (SIGHUP) so new TLS handshakes see the CRL; the plugin
    refuses the certificates at CONNECT and drops live connections within a second anyway.
    """
    paths = PkiPaths(Path(root))
    ca = CertificateAuthority.load(paths)  # fail before touching the registry
    with open_registry(paths) as registry:
        revoked = registry.revoke(target, actor=actor, with_claim=with_claim)
        _rebuild_crl(paths, ca, registry)
    return revoked


def refresh_crl(root: Path, *, min_days_left: int = 30) -> bool:
    """Rewrite the CRL if it is missing, invalid, expiring soon or behind the registry.

    Called at broker start: an expired CRL would lock every client out, and a crash between a
    revocation and its CRL write would leave a revoked certificate still accepted.
    """
    paths = PkiPaths(Path(root))
    ca = CertificateAuthority.load(paths)
    with open_registry(paths) as registry:
        revoked = {serial for serial, _ in registry.revoked_certificates()}
        try:
            crl = load_crl(paths.crl)
            ca.validate_crl(crl)
        except PkiError:
            crl = None
        if crl is not None:
            next_update = crl.next_update_utc
            fresh = next_update is not None and next_update - utc_now() > dt.timedelta(
                days=min_days_left
            )
            if fresh and {entry.serial_number for entry in crl} == revoked:
                return False
        _rebuild_crl(paths, ca, registry)
    return True
