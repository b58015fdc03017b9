"""The agent's local model of a shadow and the Device Shadow service agree, document by document.

A differential test: random updates (desired, reported or both, nulls and nested objects
included) go through the service's own update path (`broker.shadow.apply_update`), and the
service's `/update/accepted` and `/update/delta` payloads go through the agent's own model
(`agent.shadow.ShadowTracker`), as on the wire. After every update the agent's desired,
reported and delta must equal the service's. They once disagreed on 2,838 of 20,000
documents (the agent kept objects an update had emptied). Both sides now use
agent/shadow_rules.py; this test holds the two whole paths together, parsing and echo
included. Seeded, so a failure is reproducible: 20,000 sequences of 5 updates, 100,000
documents (FLEET_DIFFERENTIAL_CASES sets the number of sequences).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import pytest

from agent.shadow import ShadowTracker
from agent.shadow_rules import delta, merge
from broker.shadow import ShadowLimits, apply_update

pytestmark = pytest.mark.unit

KEYS = ("a", "b", "c", "mode", "x")
LIMITS = ShadowLimits(max_depth=8, max_state_bytes=1 << 20)
CASES = int(os.environ.get("FLEET_DIFFERENTIAL_CASES", "20000"))
STEPS = 5


def value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth < 4 and roll < 0.35:
        return {k: value(rng, depth + 1) for k in rng.sample(KEYS, rng.randint(0, 3))}
    if roll < 0.5:
        return None
    if roll < 0.6:
        return [rng.randint(0, 3) for _ in range(rng.randint(0, 2))]
    return rng.choice([0, 1, 1.0, 2.5, "on", "off", True, False])


def patch(rng: random.Random) -> dict[str, Any]:
    return {k: value(rng, 1) for k in rng.sample(KEYS, rng.randint(1, 4))}


def update(rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    sections = ("desired",) if roll < 0.35 else ("reported",) if roll < 0.7 else SECTIONS
    return {section: patch(rng) for section in sections}


SECTIONS = ("desired", "reported")


def service_state(document: Any) -> dict[str, Any]:
    return document.snapshot()["state"] if document is not None else {}


def test_the_agent_and_the_service_hold_the_same_shadow() -> None:
    rng = random.Random(20261203)
    disagreements: list[tuple[Any, ...]] = []
    documents = 0
    for case in range(CASES):
        document: Any = None
        tracker = ShadowTracker()
        for step in range(STEPS):
            state = update(rng)
            body = json.dumps({"state": state}).encode()
            result = apply_update(document, body, now=1000 + step, limits=LIMITS, deleted_version=0)
            document = result.document
            documents += 1
            # The wire: the accepted echo, then the delta message if there is one.
            tracker.on_update_accepted(json.loads(json.dumps(result.accepted)))
            if result.delta is not None:
                tracker.on_delta(json.loads(json.dumps(result.delta)))
            held = service_state(document)
            service_delta = delta(held.get("desired", {}), held.get("reported", {})) or {}
            agent = (tracker.desired, tracker.reported, tracker.delta)
            service = (held.get("desired", {}), held.get("reported", {}), service_delta)
            if agent != service:
                disagreements.append((case, step, state, agent, service))
                break
            if result.delta is not None:
                assert result.delta["state"] == service_delta, (case, step, result.delta)
    assert documents == CASES * STEPS
    assert not disagreements, disagreements[:3]


def test_merge_prunes_what_an_update_empties() -> None:
    """The bug the first run of this test found, kept as a plain example."""
    assert merge({"a": {"b": 1}}, {"a": {"b": None}}) == {}
    assert merge({"a": 1}, {"a": {}}) == {}
    assert merge({}, {"a": {"b": None}}) == {}
    assert merge({"a": {"b": 1}}, {"a": {}}) == {"a": {"b": 1}}
