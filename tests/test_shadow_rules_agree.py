"""The agent's local model of a shadow and the Device Shadow service apply an update alike.

A differential test: the same random documents and updates through `agent.shadow.merge` and
through the service's own update path (`broker.shadow.apply_update`), compared state by
state. They once disagreed on 2,838 of 20,000 documents (the agent kept objects an update
had emptied; the service removes them). Seeded, so a failure is reproducible.
"""

from __future__ import annotations

import json
import random
from typing import Any

from agent.shadow import merge
from broker.shadow import ShadowLimits, apply_update

KEYS = ("a", "b", "c", "mode", "x")
LIMITS = ShadowLimits(max_depth=8, max_state_bytes=1 << 20)


def value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth < 4 and roll < 0.35:
        return {k: value(rng, depth + 1) for k in rng.sample(KEYS, rng.randint(0, 3))}
    if roll < 0.5:
        return None
    if roll < 0.6:
        return [rng.randint(0, 3) for _ in range(rng.randint(0, 2))]
    return rng.choice([0, 1, 2.5, "on", "off", True, False])


def patch(rng: random.Random) -> dict[str, Any]:
    return {k: value(rng, 1) for k in rng.sample(KEYS, rng.randint(1, 4))}


def service_reported(current: Any, update: dict[str, Any], now: int) -> tuple[Any, dict]:
    body = json.dumps({"state": {"reported": update}}).encode()
    result = apply_update(current, body, now=now, limits=LIMITS, deleted_version=0)
    return result.document, result.document.snapshot()["state"].get("reported", {})


def test_the_agent_and_the_service_merge_alike() -> None:
    rng = random.Random(20261203)
    disagreements = []
    for case in range(4000):
        document, agent_view = None, {}
        for step in range(5):
            update = patch(rng)
            if not any(v is not None for v in update.values()) and document is None:
                continue  # a first update of nulls only: the service has nothing to create
            document, reported = service_reported(document, update, now=1000 + step)
            agent_view = merge(agent_view, update)
            if agent_view != reported:
                disagreements.append((case, step, update, agent_view, reported))
                break
    assert not disagreements, disagreements[:3]
