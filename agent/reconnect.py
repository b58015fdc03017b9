"""When to reconnect: exponential backoff with full jitter, pure logic.

Failures are told apart because they call for different waits:

- ``transient`` (unreachable, timeout, connection lost, closed by us): start fast, double up to
  a cap;
- ``identity`` (TLS alert from the broker, CONNACK not-authorised, or a DISCONNECT whose reason
  refuses this client): the certificate or the broker's registry must change first, so wait
  much longer and say so;
- ``revoked``: retrying cannot help; the caller stops (see `CertificateRevoked` in runtime).

How soon a connection ended says nothing by itself: a broker restarted twice in a row, or our
own close after a local error, ends one right after CONNACK too. Only the broker's own reason
code counts as a refusal.

The failure count is reset once a connection has stayed up for ``stable_after`` seconds, so a
flapping link keeps backing off while a long-lived one reconnects quickly after a blip.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

FailureKind = Literal["transient", "identity"]
#: How a connection ended: we closed it, it was lost (a plain socket EOF, a keepalive timeout,
#: a DISCONNECT that refuses nothing), or the broker refused this client with its DISCONNECT.
Ending = Literal["ours", "lost", "refused"]

#: DISCONNECT reason codes that refuse this client (MQTT 5, 3.14.2.1), not the connection:
#: bad credentials, not authorised, banned, use another server, server moved. Not 0x98
#: (administrative action, a kick: the next handshake says whether the certificate is still
#: good) nor 0x80 (also what a socket closed without DISCONNECT reports).
REFUSALS: Final = frozenset({0x86, 0x87, 0x8A, 0x9C, 0x9D})


def ending(closed_by_us: bool, reason_code: int | None) -> Ending:
    """How a connection ended, from who closed it and the broker's DISCONNECT reason code."""
    if closed_by_us:
        return "ours"
    return "refused" if reason_code in REFUSALS else "lost"


@dataclass(frozen=True)
class ReconnectPolicy:
    base_delay: float = 1.0
    max_delay: float = 120.0
    identity_min_delay: float = 60.0
    identity_max_delay: float = 900.0
    stable_after: float = 60.0


class Backoff:
    def __init__(
        self,
        policy: ReconnectPolicy | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.policy = policy or ReconnectPolicy()
        self.failures = 0
        self._uniform = uniform

    def failed(self, kind: FailureKind) -> float:
        """Record a failure; return the seconds to wait before the next attempt."""
        self.failures += 1
        p = self.policy
        if kind == "identity":
            ceiling = min(p.identity_max_delay, p.identity_min_delay * 2 ** (self.failures - 1))
            return self._uniform(p.identity_min_delay, max(p.identity_min_delay, ceiling))
        ceiling = min(p.max_delay, p.base_delay * 2 ** (self.failures - 1))
        return self._uniform(0.0, ceiling)

    def connection_ended(self, lasted: float, how: Ending = "lost") -> FailureKind | None:
        """After a connection that lasted ``lasted`` seconds and ended ``how``: the kind of
        failure it counts as, or None for an ordinary drop of a stable connection (the count
        is reset then)."""
        stable = lasted >= self.policy.stable_after
        if stable:
            self.failures = 0
        if how == "refused":
            return "identity"
        return None if stable else "transient"
