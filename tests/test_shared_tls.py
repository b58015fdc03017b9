"""simulator/shared_tls.py: one TLS context, many device identities, each connection its own.

The claim rests on OpenSSL copying the context's certificate and key into a connection when
its TLS object is made. The plugin admits a device only with the client id its certificate's
thing names, so every session accepted below presented its own certificate, including when
the handshakes of twenty devices interleave with each other's loads.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from agent.session import ConnectRefused, SessionError, connect
from simulator import shared_tls
from tests.fleet import Credentials, Fleet

pytestmark = pytest.mark.stack

DEVICES = 20


def identity_of(fleet: Fleet, creds: Credentials):
    return shared_tls.identity(fleet.pki.ca_cert, creds.key.read_bytes(), creds.cert.read_bytes())


def test_interleaved_handshakes_each_present_their_own_certificate(fleet: Fleet) -> None:
    things = [f"shared-{i:02d}" for i in range(DEVICES)]
    identities = [identity_of(fleet, fleet.device(thing)) for thing in things]

    async def main() -> list[str]:
        sessions = await asyncio.gather(
            *(
                connect("localhost", fleet.config.port, client_id=thing, context=source)
                for thing, source in zip(things, identities, strict=True)
            )
        )
        try:
            # Another identity loaded after they connected does not touch them.
            identities[0]()
            return [s.client_id for s in sessions if not s.closed]
        finally:
            await asyncio.gather(*(s.disconnect() for s in sessions))

    assert asyncio.run(main()) == things
    assert len({id(source()) for source in identities}) == 1, "one context for all"


def test_a_device_cannot_be_another_through_the_shared_context(fleet: Fleet) -> None:
    """Loading A's pair then connecting as B's thing is refused: the identity is the pair
    loaded last before the connection was made, never a mix."""
    a, b = (
        identity_of(fleet, fleet.device("shared-a")),
        identity_of(fleet, fleet.device("shared-b")),
    )

    async def main() -> None:
        b()  # loaded first, then A's pair right before A's connection: it connects as A
        with pytest.raises(ConnectRefused):
            await connect("localhost", fleet.config.port, client_id="shared-b", context=a)

    asyncio.run(main())


def test_a_key_that_is_not_the_certificates_is_refused_at_once(fleet: Fleet) -> None:
    one, other = fleet.device("shared-x"), fleet.device("shared-y")
    with pytest.raises(SessionError, match="mismatch"):
        shared_tls.identity(fleet.pki.ca_cert, other.key.read_bytes(), one.cert.read_bytes())


def test_no_file_of_the_key_is_left_behind(fleet: Fleet, tmp_path: Path) -> None:
    creds = fleet.device("shared-z")
    source = identity_of(fleet, creds)
    for _ in range(50):
        source()
    gc.collect()
    leaked = [p for p in Path("/proc/self/fd").iterdir() if "fleet-sim-identity" in _target(p)]
    assert leaked == []


def _target(fd: Path) -> str:
    try:
        return str(fd.readlink())
    except OSError:
        return ""
