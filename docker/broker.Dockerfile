# syntax=docker/dockerfile:1
# The broker of docker compose: Mosquitto from the eclipse-mosquitto image (Alpine) plus the
# mqtt-fleet plugin, compiled for that very image. Build context: the repository root.
#
# 2.0, not `2` or `latest`: those tags now carry Mosquitto 2.1, and the plugin is written and
# tested against the 2.0 plugin API (v5) and 2.0's behaviour (../../shared/DESIGN.md).
ARG MOSQUITTO_IMAGE=eclipse-mosquitto:2.0

FROM ${MOSQUITTO_IMAGE} AS plugin
# The image has no headers. It records the release it runs (VERSION) and the checksum of that
# release's source tarball (DOWNLOAD_SHA256), so the plugin is compiled against exactly that
# release's headers, with the image's own toolchain, musl libc, OpenSSL and SQLite.
RUN apk add --no-cache build-base openssl-dev sqlite-dev
RUN test -n "${VERSION:-}" && test -n "${DOWNLOAD_SHA256:-}" \
    || { echo "the base image records no Mosquitto VERSION / DOWNLOAD_SHA256" >&2; exit 1; }; \
    wget -q -O /tmp/mosquitto.tar.gz "https://mosquitto.org/files/source/mosquitto-${VERSION}.tar.gz" \
    && echo "${DOWNLOAD_SHA256}  /tmp/mosquitto.tar.gz" | sha256sum -c - \
    && mkdir -p /build/mosquitto \
    && tar -xzf /tmp/mosquitto.tar.gz --strip-components=1 -C /build/mosquitto \
    && rm /tmp/mosquitto.tar.gz
COPY broker/plugin/fleet_plugin.c broker/plugin/topic_match.c broker/plugin/topic_match.h \
    broker/plugin/Makefile /build/plugin/
# The Makefile's flags without -Werror: a warning new to this compiler must not fail the
# image build (the native build, which the tests run, keeps -Werror).
RUN make -C /build/plugin \
    CFLAGS="-O2 -fPIC -Wall -Wextra -std=gnu11 -I/build/mosquitto/include"

FROM ${MOSQUITTO_IMAGE}
# The plugin links libcrypto (in the image already, Mosquitto uses it) and libsqlite3.
RUN apk add --no-cache sqlite-libs
COPY --from=plugin /build/plugin/fleet_plugin.so /usr/lib/mosquitto-fleet/fleet_plugin.so
# The mount points of the broker's named volumes, owned as in docker/fleet.Dockerfile (a named
# volume takes the owner and mode of the folder of the image that first mounts it): the broker
# (group 1883) reads /fleet/broker and /fleet/crl, and creates in /fleet/registry the -shm file
# that SQLite's WAL mode needs next to the database. /mosquitto/data is the broker's own.
RUN mkdir -p /mosquitto/data /fleet/broker /fleet/crl /fleet/registry \
    && chown 1883:1883 /mosquitto/data \
    && chown 10001:1883 /fleet/broker /fleet/crl /fleet/registry \
    && chmod 0700 /mosquitto/data \
    && chmod 0750 /fleet/broker /fleet/crl \
    && chmod 0770 /fleet/registry
# Mosquitto runs as its own user from the start, never as root: the image's entry point then
# leaves /mosquitto alone, and Mosquitto ignores `user mosquitto` (it drops privileges only
# when started as root). It listens on 8883, which needs no privilege.
USER 1883:1883
CMD ["mosquitto", "-c", "/etc/fleet/mosquitto/mosquitto.conf"]
