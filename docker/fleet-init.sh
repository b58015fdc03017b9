#!/bin/sh
# docker compose's `init` service, before every other one at every `up` (safe to run again).
# Runs as uid 10001 with group 1883, the broker's group (docker-compose.yml), so what it writes
# for the broker is readable by the broker through the group and by no one else.
#
#   /fleet/pki           `pki`: the broker side's folder (`fleet-broker --dir`): the CA, the
#                        broker, claim and service credentials (once). The broker never mounts it.
#   /fleet/pki/registry  `registry`: the registry, which the broker mounts too (/fleet/registry).
#   /fleet/broker        `broker-files`: copies of what Mosquitto reads: ca.pem, broker.pem,
#                        broker.key, and the plugin's policy (rendered from the installed code).
#   /fleet/crl           `broker-crl`: crl.pem as the broker reads it; the `services` container
#                        copies /fleet/pki/crl.pem there again after each revocation.
#   /fleet/device        `device-files`: only what a device's factory image holds, the CA
#                        certificate and the shared claim certificate and key.
set -eu

if [ ! -f /fleet/pki/ca.key ]; then
    # Everything in the stack reaches the broker as "broker", so the broker certificate must
    # name it; localhost and 127.0.0.1 are in it already, for clients on the published port.
    fleet-broker --dir /fleet/pki init --host broker
fi
# The broker opens the registry read-only but, in WAL mode, must write the -shm file next to
# it. SQLite gives -wal and -shm the database's mode, whoever creates them: group read-write
# lets the broker (group 1883) and the services (10001, group 1883) share them.
chmod 0660 /fleet/pki/registry/registry.db
mkdir -p /fleet/pki/run  # the services' ready file

# As `fleet-broker up` does before it starts Mosquitto: a CRL that is missing, expiring or
# behind the registry (a crash between a revocation and its CRL) is written anew.
python -c 'from pathlib import Path; from broker.bootstrap import refresh_crl; refresh_crl(Path("/fleet/pki"))'

# publish SOURCE TARGET MODE: a copy that readers see whole (a temp file, then a rename).
# -p keeps the owner a root run gives (the broker key belongs to Mosquitto's user then).
publish() {
    cp -p "$1" "$2.tmp"
    chmod "$3" "$2.tmp"
    mv -f "$2.tmp" "$2"
}

publish /fleet/pki/ca.pem /fleet/broker/ca.pem 0644
publish /fleet/pki/broker.pem /fleet/broker/broker.pem 0644
publish /fleet/pki/broker.key /fleet/broker/broker.key 0640
python -c 'import sys; from broker.policy import render; sys.stdout.write(render())' \
    > /fleet/broker/policy.acl.tmp
chmod 0644 /fleet/broker/policy.acl.tmp
mv -f /fleet/broker/policy.acl.tmp /fleet/broker/policy.acl
publish /fleet/pki/crl.pem /fleet/crl/crl.pem 0644

publish /fleet/pki/ca.pem /fleet/device/ca.pem 0644
publish /fleet/pki/claim.pem /fleet/device/claim.pem 0644
publish /fleet/pki/claim.key /fleet/device/claim.key 0600
