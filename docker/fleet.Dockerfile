# syntax=docker/dockerfile:1
# The Python side of docker compose: fleet-broker (PKI, registry, fleet services), fleet-agent
# and fleet-sim (with Locust), installed from this repository. Build context: the repository
# root; fleet.Dockerfile.dockerignore lets in only what is installed, never certs/ or keys.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# The broker container runs Mosquitto as uid/gid 1883 (user mosquitto of eclipse-mosquitto).
# The same user here lets `fleet-broker init` hand it the broker key and the registry folder,
# exactly as it does on a host where Mosquitto drops to its own user.
RUN groupadd --system --gid 1883 mosquitto \
    && useradd --system --uid 1883 --gid 1883 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mosquitto

WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY broker ./broker
COPY simulator ./simulator
RUN pip install --no-cache-dir . && rm -rf /src

COPY --chmod=0755 docker/fleet-init.sh /usr/local/bin/fleet-init
WORKDIR /
# Logs reach `docker compose logs` as they happen.
ENV PYTHONUNBUFFERED=1
