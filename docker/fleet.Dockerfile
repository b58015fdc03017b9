# syntax=docker/dockerfile:1
# The Python side of docker compose: fleet-broker (PKI, registry, fleet services), fleet-agent
# and fleet-sim (with Locust), installed from this repository. Build context: the repository
# root; fleet.Dockerfile.dockerignore lets in only what is installed, never certs/ or keys.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Every container of this image runs as `fleet` (uid 10001), never as root. Group 1883 is the
# broker's (user mosquitto of eclipse-mosquitto, uid/gid 1883): the broker side's containers
# (init, services, demo) run as 10001:1883 (docker-compose.yml `user:`), so what they write
# for the broker (its TLS files, the CRL, the registry) is readable by it through the group.
RUN groupadd --system --gid 1883 mosquitto \
    && groupadd --gid 10001 fleet \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/fleet \
       --shell /usr/sbin/nologin fleet

WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY broker ./broker
COPY simulator ./simulator
RUN pip install --no-cache-dir '.[locust]' && rm -rf /src

COPY --chmod=0755 docker/fleet-init.sh /usr/local/bin/fleet-init
COPY --chmod=0755 docker/fleet-services.sh /usr/local/bin/fleet-services

# The mount points of docker-compose.yml's named volumes. A named volume takes the owner and
# mode of the image's folder when a container first mounts it, so these decide who may write
# what (tests/test_compose.py reads the chown/chmod lines below and checks every mount):
#   /fleet/pki           pki           the broker side's folder, CA key included: fleet only
#   /fleet/pki/registry  registry      group 1883 may write: SQLite WAL needs the folder
#   /fleet/broker        broker-files  what Mosquitto reads (group 1883 reads)
#   /fleet/crl           broker-crl    the CRL as the broker reads it (group 1883 reads)
#   /fleet/device        device-files  what a device's factory image holds
#   /var/lib/fleet-agent agent-state   the agent's key and certificate (the agent wants 0700)
#   /run/fleet-agent     agent-control the agent's control socket
#   /reports             reports       the measured run's and Locust's reports
RUN mkdir -p /fleet/pki/registry /fleet/broker /fleet/crl /fleet/device /var/lib/fleet-agent \
       /run/fleet-agent /reports \
    && chown 10001:10001 /fleet/pki /fleet/device /var/lib/fleet-agent /run/fleet-agent /reports \
    && chown 10001:1883 /fleet/pki/registry /fleet/broker /fleet/crl \
    && chmod 0700 /fleet/pki /fleet/device /var/lib/fleet-agent /run/fleet-agent \
    && chmod 0755 /reports \
    && chmod 0770 /fleet/pki/registry \
    && chmod 0750 /fleet/broker /fleet/crl

WORKDIR /
# Logs reach `docker compose logs` as they happen.
ENV PYTHONUNBUFFERED=1
USER 10001:10001
