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
COPY broker/plugin/fleet_plugin.c broker/plugin/Makefile /build/plugin/
# The Makefile's flags without -Werror: a warning new to this compiler must not fail the
# image build (the native build, which the tests run, keeps -Werror).
RUN make -C /build/plugin \
    CFLAGS="-O2 -fPIC -Wall -Wextra -std=gnu11 -I/build/mosquitto/include"

FROM ${MOSQUITTO_IMAGE}
# The plugin links libcrypto (in the image already, Mosquitto uses it) and libsqlite3.
RUN apk add --no-cache sqlite-libs
COPY --from=plugin /build/plugin/fleet_plugin.so /usr/lib/mosquitto-fleet/fleet_plugin.so
# The image's entry point gives /mosquitto to the mosquitto user (uid 1883); Mosquitto starts
# as root and drops to that user before it reads the broker key (which `fleet-broker init`
# hands to uid 1883) and opens the registry.
CMD ["mosquitto", "-c", "/etc/fleet/mosquitto/mosquitto.conf"]
