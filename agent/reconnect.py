"""When to reconnect: exponential backoff with full jitter, pure logic.

Failures are told apart because they call for different waits:

- ``transient`` (unreachable, timeout, connection lost): start fast, double up to a cap;
- ``identity`` (TLS alert from the broker, CONNACK not-authorised, or a disconnect right after
  CONNACK, which is how a broker that refuses a client late behaves): the certificate or the
  broker's registry must change first, so wait much longer and say so;
- ``revoked``: retrying cannot help; the caller stops (see `CertificateRevoked` in runtime).

The failure count is reset once a connection has stayed up for ``stable_after`` seconds, so a
flapping link keeps backing off while a long-lived one reconnects quickly after a blip.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FailureKind = Literal["transient", "identity"]


@dataclass(frozen=True)
class ReconnectPolicy:
    base_delay: float = 1.0
    max_delay: float = 120.0
    identity_min_delay: float = 60.0
    identity_max_delay: float = 900.0
    stable_after: float = 60.0
    #: A connection that ends sooner than this after CONNACK counts as an identity refusal.
    early_disconnect: float = 2.0


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

    def connection_ended(self, lasted: float) -> FailureKind | None:
        """After a connection that lasted ``lasted`` seconds: reset when it was stable; the
        kind of failure it counts as when it ended early; None for an ordinary drop."""
        if lasted >= self.policy.stable_after:
            self.failures = 0
            return None
        if lasted < self.policy.early_disconnect:
            return "identity"
        return "transient"
