#!/bin/sh
# docker compose's `init` service. Into the `pki` volume: the CA, the broker, claim and service
# credentials and the registry (once), and the plugin's policy (every time, from the installed
# code). Into the `device-files` volume: only what a device's factory image holds, the CA
# certificate and the shared claim certificate and key. Safe to run at every `up`.
set -eu

if [ ! -f /fleet/pki/ca.key ]; then
    # Everything in the stack reaches the broker as "broker", so the broker certificate must
    # name it; localhost and 127.0.0.1 are in it already, for clients on the published port.
    fleet-broker --dir /fleet/pki init --host broker
fi

mkdir -p /fleet/pki/run
python -c 'import sys; from broker.policy import render; sys.stdout.write(render())' \
    > /fleet/pki/run/policy.acl

cp /fleet/pki/ca.pem /fleet/pki/claim.pem /fleet/device/
cp -p /fleet/pki/claim.key /fleet/device/claim.key  # -p: stays 0600
