#!/bin/sh
# docker compose's `services` service: the fleet services (python -m broker.services, with the
# arguments given) and the publisher of the CRL to the broker.
#
# The broker container cannot read the `pki` volume (the CA key is in it), so it reads its CRL
# from the `broker-crl` volume, which holds crl.pem and nothing else. A revocation, the demo's
# or a `fleet-broker revoke` run in this container, rewrites /fleet/pki/crl.pem; within a second
# this script copies it to /fleet/crl/crl.pem (a temp file, then a rename), where Mosquitto
# reads it at its next reload (`docker compose kill -s HUP broker`). Until then the plugin's
# registry check refuses a revoked certificate at CONNECT.
set -eu
source=/fleet/pki/crl.pem
published=/fleet/crl/crl.pem

publish() {
    if [ -f "$source" ] && ! cmp -s "$source" "$published"; then
        cp "$source" "$published.tmp" && chmod 0644 "$published.tmp" \
            && mv -f "$published.tmp" "$published"
    fi
}

publish  # at start, a failure stops the container (restart: on-failure shows it)
python -m broker.services "$@" &
services=$!
(
    # Ends with the services, also if this script is killed.
    while kill -0 "$services" 2>/dev/null; do
        publish || echo "fleet-services: cannot copy $source to $published" >&2
        sleep 1
    done
) &
publisher=$!
# docker compose stop (SIGTERM) and Ctrl-C reach this script first: the services get them.
trap 'kill -TERM "$services" 2>/dev/null || true' TERM INT
while :; do
    status=0
    wait "$services" || status=$?
    # wait also returns when a trapped signal arrives: go on until the services have exited.
    kill -0 "$services" 2>/dev/null || break
done
kill "$publisher" 2>/dev/null || true
exit "$status"
