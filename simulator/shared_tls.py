"""One TLS context for all the virtual devices of a process, each connection with its own identity.

A client SSLContext (an OpenSSL 3 SSL_CTX with the CA store) costs about 25 KB; one per device
was a third of a simulated device's memory (bench/sim_memory.py). OpenSSL copies a context's
certificate and key into a connection when the connection's TLS object is made (SSL_new
duplicates the context's CERT), and later loads into the context do not reach it. So one
context serves every device: a device's pair is loaded into it right before that device's
TLS object is made, with no await in between (agent.session.open_tls calls the identity's
loader synchronously; a worker runs one event loop thread). The CA store and the settings
are the same for the whole fleet and are shared as well.

A device keeps only its PEM key and certificate (about 1 KB) instead of a context. OpenSSL
reads chains from files only: each load goes through a memfd, an anonymous in-memory file
that no other process can open by name, closed at once.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from agent.session import SessionError, describe_error, verifying_context


@functools.cache
def shared_context(ca_file: Path) -> ssl.SSLContext:
    """The process's one verifying context for ``ca_file`` (no identity of its own)."""
    return verifying_context(ca_file)


def identity(ca_file: Path, key_pem: bytes, certificate_pem: bytes) -> Callable[[], ssl.SSLContext]:
    """A TlsSource for agent.session.connect: the shared context, loaded with this pair."""
    pair = certificate_pem + key_pem
    context = shared_context(ca_file)
    load_pair(context, pair)  # a bad pair fails here, at onboarding, not at a later connect

    def loaded() -> ssl.SSLContext:
        load_pair(context, pair)
        return context

    return loaded


def load_pair(context: ssl.SSLContext, pair: bytes) -> None:
    """Load a PEM certificate followed by its PEM key into ``context``."""
    fd = os.memfd_create("fleet-sim-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, pair)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except (OSError, ssl.SSLError) as exc:
        why = describe_error(exc)
        raise SessionError(f"cannot use the device's certificate and key: {why}") from None
    finally:
        os.close(fd)
