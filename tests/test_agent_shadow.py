"""agent.shadow, the device's half of the Device Shadow rules: pure, no broker needed.

The oracle is shared/reference/aws-iot-mqtt-api.md section 2: 2.3 (merge), 2.5 (delta
comparison: 1 == 1.0, bools are not numbers, arrays whole) and 2.7 (stale versions ignored).
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from agent.shadow import (
    CLIENT_TOKEN_BYTES,
    NextStep,
    Rejection,
    ReportDecision,
    ReportQueue,
    ReportQueueFull,
    ShadowProtocolError,
    ShadowTracker,
    after_report,
    changes,
    compose,
    new_client_token,
    update_request,
)
from agent.shadow_rules import equal, merge

pytestmark = pytest.mark.unit

Doc = dict[str, Any]

# ---------------------------------------------------------------- random documents

KEYS = ("a", "b", "c")
LEAVES: tuple[Any, ...] = (0, 1, 1.0, 2, True, False, "x", "", [1, 2], [2, 1], [], [{"a": 1}])


def random_patch(rng: random.Random, depth: int = 3) -> Doc:
    """A patch over a tiny key space (so keys collide often): nulls, leaves, nested patches."""
    patch: Doc = {}
    for key in rng.sample(KEYS, rng.randint(0, len(KEYS))):
        roll = rng.random()
        if roll < 0.25:
            patch[key] = None
        elif roll < 0.6 and depth > 0:
            patch[key] = random_patch(rng, depth - 1)
        else:
            patch[key] = copy.deepcopy(rng.choice(LEAVES))
    return patch


def random_document(rng: random.Random, depth: int = 3) -> Doc:
    """A stored document: like a patch but without nulls."""
    document: Doc = {}
    for key in rng.sample(KEYS, rng.randint(0, len(KEYS))):
        if rng.random() < 0.4 and depth > 0:
            document[key] = random_document(rng, depth - 1)
        else:
            document[key] = copy.deepcopy(rng.choice(LEAVES))
    return document


def canon(value: object) -> str:
    """Exact comparison: 1, 1.0 and True stay distinct, key order does not matter."""
    return json.dumps(value, sort_keys=True)


def not_expressible(first: Doc, second: Doc) -> bool:
    """Spec of compose's None: somewhere ``second`` merges an object into a key that ``first``
    deleted or set to a non-object."""
    return any(
        isinstance(value, dict)
        and key in first
        and (not isinstance(first[key], dict) or not_expressible(first[key], value))
        for key, value in second.items()
    )


def prune(value: object) -> object:
    """The service's storage rule: empty objects are never stored."""
    if not isinstance(value, dict):
        return value
    pruned = {k: prune(v) for k, v in value.items()}
    return {k: v for k, v in pruned.items() if not (isinstance(v, dict) and not v)}


# ---------------------------------------------------------------------- same_value


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, 1.0),
        (0, -0.0),
        ({"x": 1, "y": {"z": 2.0}}, {"y": {"z": 2}, "x": 1.0}),
        ([1, [2, {"a": 3}]], [1.0, [2.0, {"a": 3.0}]]),
        (True, True),
        (None, None),
        ("s", "s"),
        ({}, {}),
        ([], []),
    ],
)
def test_same_value_equal(a: object, b: object) -> None:
    """Numbers compare numerically, objects key by key (any order), arrays element-wise."""
    assert equal(a, b)
    assert equal(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (True, 1),
        (False, 0),
        (1.0, True),
        ([1, True], [1, 1]),
        ({"x": True}, {"x": 1}),
        ([1, 2], [2, 1]),
        ([1, 2], [1, 2, 3]),
        ({"x": 1}, {"x": 1, "y": 2}),
        ({"x": {"y": 1}}, {"x": {"y": 2}}),
        ("1", 1),
        (None, 0),
        (None, {}),
        ({}, []),
        ([], None),
    ],
)
def test_same_value_different(a: object, b: object) -> None:
    """A bool is never a number; arrays are ordered and whole; types must match."""
    assert not equal(a, b)
    assert not equal(b, a)


# --------------------------------------------------------------------------- merge


def test_merge_null_deletes_key() -> None:
    """2.3: ``"key": null`` removes the key; deleting an absent key is harmless."""
    assert merge({"a": 1, "b": 2}, {"a": None, "z": None}) == {"b": 2}


def test_merge_partial_and_nested() -> None:
    """2.3: only keys in the patch change; nested objects merge recursively."""
    base = {"keep": 1, "n": {"x": 1, "y": {"p": 1, "q": 2}}}
    patch = {"n": {"y": {"q": None, "r": 3}, "z": 4}}
    assert merge(base, patch) == {"keep": 1, "n": {"x": 1, "y": {"p": 1, "r": 3}, "z": 4}}


def test_merge_arrays_replaced_whole() -> None:
    """2.3: arrays are values: replaced, never merged element-wise."""
    assert merge({"l": [1, 2, 3]}, {"l": [9]}) == {"l": [9]}
    assert merge({"l": [{"a": 1}]}, {"l": [{"b": 2}]}) == {"l": [{"b": 2}]}


def test_merge_type_changes_replace() -> None:
    """2.3: an object replaces a scalar (its nulls dropped), a scalar replaces an object."""
    assert merge({"k": 5}, {"k": {"a": 1, "b": None}}) == {"k": {"a": 1}}
    assert merge({"k": [1]}, {"k": {"a": 1}}) == {"k": {"a": 1}}
    assert merge({"k": {"a": 1}}, {"k": 5}) == {"k": 5}
    assert merge({"k": {"a": 1}}, {"k": [1]}) == {"k": [1]}


def test_merge_none_base() -> None:
    """No base is an empty document."""
    # "c" ends empty: removed, as the service removes it (tests/test_shadow_rules_agree.py).
    assert merge(None, {"a": 1, "b": None, "c": {"d": None}}) == {"a": 1}


def test_merge_does_not_modify_inputs() -> None:
    """``base`` (and its nested objects) and ``patch`` are left as they were."""
    base = {"n": {"x": 1, "y": {"p": 1}}, "l": [1], "k": 1}
    patch = {"n": {"y": {"p": None, "q": 2}, "x": None}, "l": [2], "k": None}
    before_base, before_patch = copy.deepcopy(base), copy.deepcopy(patch)
    merge(base, patch)
    assert base == before_base
    assert patch == before_patch


# ------------------------------------------------------------------------- compose


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ({}, {}, {}),
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1}, {"a": None}, {"a": None}),
        ({"a": None}, {"a": 1}, {"a": 1}),
        ({"a": {"x": 1}}, {"a": {"y": 2}}, {"a": {"x": 1, "y": 2}}),
        ({"a": {"x": 1}}, {"a": {"x": None}}, {"a": {"x": None}}),
        ({"a": {"x": 1}}, {"a": 5}, {"a": 5}),
        ({"a": {"x": 1}}, {"a": None}, {"a": None}),
        ({"a": [1]}, {"a": [2, 3]}, {"a": [2, 3]}),
        ({"b": 1}, {"a": {"x": 1}}, {"b": 1, "a": {"x": 1}}),
        ({"a": {"x": {"p": 1}}}, {"a": {"x": {"q": 2}}}, {"a": {"x": {"p": 1, "q": 2}}}),
    ],
)
def test_compose_explicit(first: Doc, second: Doc, expected: Doc) -> None:
    """Composable pairs give one patch with the effect of both."""
    assert compose(first, second) == expected


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"a": None}, {"a": {"x": 1}}),
        ({"a": 5}, {"a": {"x": 1}}),
        ({"a": [1]}, {"a": {"x": 1}}),
        ({"a": "s"}, {"a": {}}),
        ({"a": None}, {"a": {"x": None}}),
        ({"a": {"x": None}}, {"a": {"x": {"p": 1}}}),
        ({"a": {"x": {"y": 1}}}, {"a": {"x": {"y": {"z": 1}}}}),
    ],
)
def test_compose_not_expressible(first: Doc, second: Doc) -> None:
    """Delete (or scalar) then object, at any depth, means "replace": compose says None."""
    assert compose(first, second) is None


def test_delete_then_object_really_is_a_replace() -> None:
    """Why None is right: after delete-then-object the key's old content is gone, which no
    single merge patch can say about keys it does not name."""
    first, second = {"k": None}, {"k": {"a": 1}}
    for base in ({}, {"k": 1}, {"k": {"z": 1}}, {"k": {"a": 0, "z": 1}}):
        assert merge(merge(base, first), second) == {"k": {"a": 1}}
    assert merge({"k": {"z": 1}}, second) == {"k": {"a": 1, "z": 1}}  # the naive candidate


def test_compose_does_not_modify_inputs() -> None:
    """``first`` and ``second`` are left as they were."""
    first = {"a": {"x": 1, "y": {"p": 1}}, "b": 1}
    second = {"a": {"y": {"q": 2}, "x": None}, "c": None}
    before = copy.deepcopy((first, second))
    compose(first, second)
    assert (first, second) == before


def test_compose_property_random() -> None:
    """For thousands of random pairs: compose is None exactly where not expressible, and
    otherwise merge(merge(base, first), second) == merge(base, composed) for every base."""
    rng = random.Random(20240611)
    composed_count = refused_count = 0
    for _ in range(3000):
        first, second = random_patch(rng), random_patch(rng)
        snapshot = canon((first, second))
        composed = compose(first, second)
        assert canon((first, second)) == snapshot
        assert (composed is None) == not_expressible(first, second), (first, second)
        if composed is None:
            refused_count += 1
            continue
        composed_count += 1
        bases = [{}, random_document(rng), random_document(rng), merge({}, first)]
        bases.append(merge(random_document(rng), second))
        for base in bases:
            sequential = merge(merge(base, first), second)
            assert canon(merge(base, composed)) == canon(sequential), (base, first, second)
    # the generator exercises both outcomes substantially
    assert composed_count > 1000
    assert refused_count > 100


# ------------------------------------------------------------------------- changes


@pytest.mark.parametrize(
    ("patch", "known"),
    [
        ({"a": 1}, {"a": 1}),
        ({"a": 1}, {"a": 1.0}),
        ({"a": 1.5}, {"a": 1.5}),
        ({"a": "s", "b": [1, 2]}, {"a": "s", "b": [1.0, 2], "c": 3}),
        ({"gone": None}, {"a": 1}),
        ({"n": {"x": 1}}, {"n": {"x": 1, "y": 2}}),
        ({"n": {"gone": None}}, {"n": {"x": 1}}),
        ({"n": {"m": {"x": 2.0}}}, {"n": {"m": {"x": 2}}}),
        ({"n": {}}, {"n": {"x": 1}}),
        ({}, {"a": 1}),
    ],
)
def test_changes_drops_no_ops(patch: Doc, known: Doc) -> None:
    """Reporting what the service already holds (numerically), or deleting what it does not
    hold, changes nothing."""
    assert changes(patch, known) == {}


@pytest.mark.parametrize(
    ("patch", "known", "expected"),
    [
        ({"a": 1, "b": 2}, {"a": 1}, {"b": 2}),
        ({"a": True}, {"a": 1}, {"a": True}),
        ({"a": 1}, {"a": True}, {"a": 1}),
        ({"a": None, "b": None}, {"a": 1}, {"a": None}),
        ({"a": [2, 1]}, {"a": [1, 2]}, {"a": [2, 1]}),
        ({"n": {"x": 1, "y": 3}}, {"n": {"x": 1.0, "y": 2}}, {"n": {"y": 3}}),
        ({"n": {"x": None, "y": None}}, {"n": {"x": 1}}, {"n": {"x": None}}),
        ({"n": {"x": 1}}, {"n": 5}, {"n": {"x": 1}}),
        ({"n": 5}, {"n": {"x": 1}}, {"n": 5}),
        ({"n": {"x": 1}}, {}, {"n": {"x": 1}}),
        ({"n": {"m": {"x": 1, "y": 1}}}, {"n": {"m": {"x": 1}}}, {"n": {"m": {"y": 1}}}),
    ],
)
def test_changes_keeps_real_changes(patch: Doc, known: Doc, expected: Doc) -> None:
    """Only what would change ``known`` is kept, with the path to it."""
    assert changes(patch, known) == expected


def test_changes_property_random() -> None:
    """Sending only the changes leaves the service (which stores no empty objects) where
    sending the whole patch would, up to numeric equality (1 vs 1.0 is not a change)."""
    rng = random.Random(7)
    for _ in range(2000):
        known = prune(random_document(rng))
        assert isinstance(known, dict)
        patch = random_patch(rng)
        delta = changes(patch, known)
        assert equal(prune(merge(known, delta)), prune(merge(known, patch))), (known, patch)


# ---------------------------------------------------------------------- ReportQueue


def apply_all(base: Doc, patches: list[Doc]) -> Doc:
    for patch in patches:
        base = merge(base, patch)
    return base


def test_queue_offline_reports_compose_into_one() -> None:
    """Reports made while offline go out as a single update."""
    queue = ReportQueue()
    assert not queue
    assert queue.head() is None
    reports = [{"a": 1}, {"b": {"x": 1}}, {"a": 2, "b": {"y": 2}}, {"c": None}, {"b": {"x": None}}]
    for report in reports:
        queue.add(report)
    assert queue
    assert queue.patches == [{"a": 2, "b": {"x": None, "y": 2}, "c": None}]


def test_queue_ignores_empty_report() -> None:
    """An empty patch adds nothing."""
    queue = ReportQueue()
    queue.add({})
    assert not queue


def test_queue_delete_then_object_makes_two_patches() -> None:
    """Where compose cannot merge, a second patch starts; in order they equal the reports."""
    queue = ReportQueue()
    reports = [{"k": None, "a": 1}, {"k": {"x": 1}}, {"b": 2}]
    for report in reports:
        queue.add(report)
    assert len(queue.patches) == 2
    for base in ({}, {"k": {"old": 1}}, {"k": 3, "a": 0, "b": 0}):
        assert apply_all(base, queue.patches) == apply_all(base, reports)


def test_queue_sealed_head_is_not_composed_into() -> None:
    """While the head is on the wire it stays as sent; pop_head unseals."""
    queue = ReportQueue()
    queue.add({"a": 1})
    queue.head_sealed = True
    queue.add({"a": 2})
    queue.add({"b": 3})
    assert queue.patches == [{"a": 1}, {"a": 2, "b": 3}]
    queue.pop_head()
    assert not queue.head_sealed
    assert queue.patches == [{"a": 2, "b": 3}]
    queue.add({"c": 4})
    assert queue.patches == [{"a": 2, "b": 3, "c": 4}]


def test_queue_pop_head_on_empty_queue_unseals() -> None:
    """pop_head on an empty queue is harmless."""
    queue = ReportQueue(head_sealed=True)
    queue.pop_head()
    assert not queue
    assert not queue.head_sealed


def test_queue_property_random() -> None:
    """Random reports, seals and accepted heads: a sealed head never changes, and the service
    ends up where the reports applied one by one would put it."""
    rng = random.Random(99)
    for _ in range(500):
        base = random_document(rng)
        service = base
        sequential = base
        queue = ReportQueue()
        sealed_as: str | None = None
        for _step in range(rng.randint(1, 8)):
            roll = rng.random()
            if roll < 0.6:
                report = random_patch(rng)
                queue.add(report)
                sequential = merge(sequential, report)
            elif roll < 0.8 and queue:
                queue.head_sealed = True
                sealed_as = canon(queue.head())
            elif queue:
                head = queue.head()
                assert head is not None
                service = merge(service, head)
                queue.pop_head()
                sealed_as = None
            if queue.head_sealed:
                assert canon(queue.head()) == sealed_as
        assert canon(apply_all(service, queue.patches)) == canon(sequential)


def test_queue_encode_decode_round_trip() -> None:
    """The queue survives a restart byte for byte (sealing is not persisted)."""
    queue = ReportQueue()
    for report in ({"k": None, "f": 1.0, "i": 1, "t": True}, {"k": {"x": [1, "é"]}}):
        queue.add(report)
    queue.head_sealed = True
    restored = ReportQueue.decode(queue.encode())
    assert canon(restored.patches) == canon(queue.patches)
    assert not restored.head_sealed
    assert json.loads(queue.encode())["format"] == 1
    assert ReportQueue.decode(ReportQueue().encode()).patches == []


def test_queue_size_is_the_encoded_size() -> None:
    queue = ReportQueue()
    queue.add({"t": "é" * 10})
    assert queue.size() == len(queue.encode())


def test_queue_bound_refuses_a_report_and_keeps_the_queue() -> None:
    """A report that would take the queue over the limit is refused; nothing queued changes."""
    queue = ReportQueue()
    queue.add({"a": "x" * 50}, max_bytes=100)
    before = queue.encode()
    with pytest.raises(ReportQueueFull) as refused:
        queue.add({"b": "y" * 50}, max_bytes=100)
    assert queue.encode() == before
    assert refused.value.limit == 100
    assert refused.value.size > 100
    assert refused.value.size == len(
        ReportQueue([{"a": "x" * 50, "b": "y" * 50}]).encode()
    )  # the size the queue would have had


def test_queue_bound_is_inclusive() -> None:
    """A queue of exactly the limit is accepted."""
    probe = ReportQueue()
    probe.add({"a": 1, "b": 2})
    queue = ReportQueue()
    queue.add({"a": 1})
    queue.add({"b": 2}, max_bytes=probe.size())
    assert queue.patches == [{"a": 1, "b": 2}]
    with pytest.raises(ReportQueueFull):
        queue.add({"c": 3}, max_bytes=probe.size())


def test_queue_bound_counts_the_composed_result() -> None:
    """At the limit, a report that only replaces a value of the same size still fits."""
    queue = ReportQueue()
    queue.add({"temp": 20, "note": "a" * 40})
    limit = queue.size()
    queue.add({"temp": 21}, max_bytes=limit)
    assert queue.patches == [{"temp": 21, "note": "a" * 40}]


def test_queue_bound_refusal_with_sealed_head_keeps_both_patches() -> None:
    queue = ReportQueue()
    queue.add({"a": 1})
    queue.head_sealed = True
    queue.add({"a": 2})
    before = copy.deepcopy(queue.patches)
    with pytest.raises(ReportQueueFull):
        queue.add({"big": "z" * 200}, max_bytes=queue.size() + 10)
    assert queue.patches == before
    assert queue.head_sealed


def test_queue_bound_refused_patch_is_not_shared() -> None:
    """A refused report leaves no trace, and a later one is unaffected by it."""
    queue = ReportQueue()
    queue.add({"n": {"x": 1}})
    with pytest.raises(ReportQueueFull):
        queue.add({"n": {"y": "v" * 100}}, max_bytes=60)
    assert queue.patches == [{"n": {"x": 1}}]
    queue.add({"n": {"z": 2}}, max_bytes=60)
    assert queue.patches == [{"n": {"x": 1, "z": 2}}]


def test_queue_over_the_limit_keeps_everything_and_takes_only_what_fits() -> None:
    """A queue already over the limit (loaded from disk after the limit was lowered) loses
    nothing; a report is accepted only if the queue then fits."""
    queue = ReportQueue([{"log": "l" * 200}])
    with pytest.raises(ReportQueueFull):
        queue.add({"x": 1}, max_bytes=100)
    assert queue.patches == [{"log": "l" * 200}]
    queue.add({"log": "short"}, max_bytes=100)  # replaces the big value: now it fits
    assert queue.patches == [{"log": "short"}]


def test_queue_without_a_limit_is_unbounded() -> None:
    queue = ReportQueue()
    queue.add({"a": "x" * 100_000})
    assert queue.size() > 100_000


def test_queue_full_message_names_size_limit_shadow_and_what_is_kept() -> None:
    message = str(ReportQueueFull(70_000, 65_536, "lights"))
    assert "shadow lights" in message
    assert "70000 bytes" in message
    assert "65536" in message
    assert "kept" in message
    assert "\n" not in message
    assert "shadow" not in str(ReportQueueFull(2, 1)).split(";")[0]


def test_queue_bound_property_random() -> None:
    """Random reports under a random limit: the queue never grows past the limit by an
    accepted report, a refused report changes nothing, and the queue always equals the
    accepted reports applied in order."""
    rng = random.Random(7)
    for _ in range(300):
        base = random_document(rng)
        limit = rng.randint(20, 400)
        queue = ReportQueue()
        accepted = base
        for _step in range(rng.randint(1, 10)):
            report = random_patch(rng)
            before = queue.encode()
            try:
                queue.add(report, max_bytes=limit)
            except ReportQueueFull as exc:
                assert exc.size > limit
                assert queue.encode() == before
                continue
            if report:
                assert queue.size() <= limit
            accepted = merge(accepted, report)
        assert canon(apply_all(base, queue.patches)) == canon(accepted)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'"patches"',
        b"{}",
        b'{"patches": {}}',
        b'{"patches": [1]}',
        b'{"patches": [{"a": 1}, null]}',
    ],
)
def test_queue_decode_errors(data: bytes) -> None:
    """Anything that is not a list of report patches is a ValueError."""
    with pytest.raises(ValueError):
        ReportQueue.decode(data)


# ------------------------------------------------------------- requests and tokens


def test_update_request() -> None:
    """An /update request reports only ``reported``; version only for optimistic locking."""
    reported = {"a": 1}
    request = update_request(reported, "tok")
    assert request == {"state": {"reported": {"a": 1}}, "clientToken": "tok"}
    assert request["state"]["reported"] is not reported
    assert update_request({}, "tok", 0)["version"] == 0
    assert update_request({}, "tok", 7)["version"] == 7


def test_new_client_token() -> None:
    """Random, prefixed and within AWS's 64-byte limit (2.8)."""
    tokens = {new_client_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(t.startswith("fa-") and len(t.encode()) <= CLIENT_TOKEN_BYTES for t in tokens)
    assert new_client_token("dev").startswith("dev-")


# ------------------------------------------------------------------------ Rejection


def test_rejection_parse() -> None:
    """AWS's error document (2.4.6): code, message, clientToken when a string."""
    rejection = Rejection.parse({"code": 409, "message": "Version conflict", "clientToken": "t"})
    assert rejection == Rejection(409, "Version conflict", "t")
    assert Rejection.parse({"code": 404}) == Rejection(404, "", None)
    assert Rejection.parse({"code": 400, "clientToken": 5}).client_token is None


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        *((code, True) for code in (409, 429, 500, 503, 504)),
        *((code, False) for code in (400, 401, 403, 404, 413, 415)),
    ],
)
def test_rejection_retryable(code: int, retryable: bool) -> None:
    """Conflicts, throttling and service failures are worth retrying; client errors are not."""
    assert Rejection(code, "", None).retryable is retryable


@pytest.mark.parametrize(
    "document", [None, [], "x", {}, {"code": "409"}, {"code": None}, {"message": "m"}]
)
def test_rejection_malformed(document: object) -> None:
    """No numeric code: not an error document."""
    with pytest.raises(ShadowProtocolError):
        Rejection.parse(document)
    assert issubclass(ShadowProtocolError, ValueError)


# --------------------------------------------------------------------- ShadowTracker


def get_doc(version: int, **state: Doc) -> Doc:
    return {"state": state, "metadata": {}, "version": version, "timestamp": 1}


def test_tracker_get_accepted() -> None:
    """A full document replaces what we know and returns its delta."""
    tracker = ShadowTracker()
    assert tracker.lock_version() is None
    delta = tracker.on_get_accepted(
        get_doc(5, desired={"a": 1, "b": 2}, reported={"a": 1}, delta={"b": 2})
    )
    assert delta == {"b": 2}
    assert tracker.version == 5
    assert tracker.exists is True
    assert tracker.desired == {"a": 1, "b": 2}
    assert tracker.reported == {"a": 1}
    assert tracker.delta == {"b": 2}
    assert tracker.lock_version() == 5


def test_tracker_get_accepted_replaces_sections() -> None:
    """Sections missing from a newer document are empty, not kept from the old one."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(1, desired={"a": 1}, reported={"b": 1}, delta={"a": 1}))
    assert tracker.on_get_accepted({"state": {}, "version": 2}) == {}
    assert (tracker.desired, tracker.reported, tracker.delta) == ({}, {}, {})


def test_tracker_stale_get_accepted_ignored() -> None:
    """2.7: a document older than what we hold changes nothing."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(5, desired={"a": 2}, reported={"a": 1}, delta={"a": 2}))
    assert tracker.on_get_accepted(get_doc(4, desired={"a": 9}, delta={"a": 9})) == {}
    assert tracker.version == 5
    assert tracker.desired == {"a": 2}
    assert tracker.delta == {"a": 2}
    assert tracker.reported == {"a": 1}


def test_tracker_own_get_is_current_even_at_a_lower_version() -> None:
    """F2: the reply to our own get is the service's document now. After its versions went
    back (a registry restored from a backup) the device takes it, and locks on its version;
    anything else at a lower version is still stale."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(9, desired={"seq": 4}, reported={"seq": 4}))
    assert tracker.on_get_accepted(get_doc(3, desired={"seq": 5}, delta={"seq": 5})) == {}
    assert tracker.version == 9
    delta = tracker.on_get_accepted(
        get_doc(3, desired={"seq": 5}, reported={"seq": 1}, delta={"seq": 5}), current=True
    )
    assert delta == {"seq": 5}
    assert (tracker.version, tracker.lock_version()) == (3, 3)
    assert (tracker.desired, tracker.reported) == ({"seq": 5}, {"seq": 1})
    assert tracker.on_delta({"state": {"seq": 6}, "version": 4}) == {"seq": 6}
    assert tracker.on_delta({"state": {"seq": 0}, "version": 2}) is None


def test_tracker_equal_version_accepted() -> None:
    """The same version is not stale (get after a delta of that version, say)."""
    tracker = ShadowTracker()
    tracker.on_delta({"state": {"a": 1}, "version": 3})
    assert tracker.on_get_accepted(get_doc(3, desired={"a": 2}, delta={"a": 2})) == {"a": 2}
    assert tracker.on_delta({"state": {"a": 3}, "version": 3}) == {"a": 3}
    tracker.on_update_accepted({"state": {"reported": {"r": 1}}, "version": 3})
    assert tracker.reported == {"r": 1}


def test_tracker_get_missing() -> None:
    """404 on get: no shadow; the first report creates it without a version."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(2, desired={"a": 1}, reported={"b": 1}, delta={"a": 1}))
    tracker.on_get_missing()
    assert tracker.exists is False
    assert (tracker.desired, tracker.reported, tracker.delta) == ({}, {}, {})
    assert tracker.lock_version() is None


def test_tracker_update_accepted_merges_echo() -> None:
    """update/accepted echoes the request: merge desired and reported into our view."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(1, desired={"d": 1, "n": {"x": 1}}, reported={"r": 1}))
    tracker.on_update_accepted(
        {
            "state": {"desired": {"n": {"x": None, "y": 2}}, "reported": {"r": None, "s": 2}},
            "version": 2,
        }
    )
    assert tracker.version == 2
    assert tracker.desired == {"d": 1, "n": {"y": 2}}
    assert tracker.reported == {"s": 2}


def test_tracker_update_accepted_null_sections() -> None:
    """``"desired": null`` / ``"reported": null`` remove the whole section; an absent
    section is untouched."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(1, desired={"d": 1}, reported={"r": 1}))
    tracker.on_update_accepted({"state": {"desired": None}, "version": 2})
    assert tracker.desired == {}
    assert tracker.reported == {"r": 1}
    tracker.on_update_accepted({"state": {"reported": None}, "version": 3})
    assert tracker.reported == {}


def test_tracker_update_accepted_state_null_clears_both() -> None:
    """2.3: ``"state": null`` clears desired and reported; the accepted echo says so."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(1, desired={"d": 1}, reported={"r": 1}))
    tracker.on_update_accepted({"state": None, "metadata": {}, "version": 2})
    assert tracker.version == 2
    assert (tracker.desired, tracker.reported) == ({}, {})
    assert tracker.report_changes({"r": 1}, ReportQueue()) == {"r": 1}


def test_tracker_update_accepted_creates_shadow() -> None:
    """The first accepted report makes the shadow exist: locking starts."""
    tracker = ShadowTracker()
    tracker.on_get_missing()
    tracker.on_update_accepted({"state": {"reported": {"a": 1}}, "version": 1})
    assert tracker.exists is True
    assert tracker.reported == {"a": 1}
    assert tracker.lock_version() == 1


def test_tracker_stale_update_accepted_ignored() -> None:
    """2.7: an update/accepted older than what we hold changes nothing."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(5, desired={"a": 1}, reported={"a": 1}))
    tracker.on_update_accepted(
        {"state": {"desired": {"a": 0}, "reported": {"a": 0, "b": 0}}, "version": 4}
    )
    assert tracker.version == 5
    assert tracker.desired == {"a": 1}
    assert tracker.reported == {"a": 1}


def test_tracker_delta() -> None:
    """A delta replaces the delta we hold; a stale one is None and changes nothing."""
    tracker = ShadowTracker()
    assert tracker.on_delta({"state": {"a": 1}, "version": 4}) == {"a": 1}
    assert tracker.exists is True
    assert tracker.version == 4
    assert tracker.on_delta({"state": {"b": 2}, "version": 6}) == {"b": 2}
    assert tracker.on_delta({"state": {"a": 0}, "version": 5}) is None
    assert tracker.delta == {"b": 2}
    assert tracker.version == 6


def test_tracker_deleted() -> None:
    """delete/accepted: no shadow any more, and its version forgotten: a shadow re-created
    more than 48 h later starts again at 1, which must not look stale."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(7, desired={"a": 1}, reported={"b": 1}, delta={"a": 1}))
    tracker.on_deleted({"version": 7, "timestamp": 1})
    assert tracker.exists is False
    assert (tracker.desired, tracker.reported, tracker.delta) == ({}, {}, {})
    assert tracker.version is None
    assert tracker.lock_version() is None
    assert tracker.on_delta({"state": {"a": 1}, "version": 1}) == {"a": 1}


def test_tracker_stale_deleted_ignored() -> None:
    """2.7: a delete of an older version than we hold happened before what we know."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(7, desired={"a": 1}, reported={"b": 1}, delta={"a": 1}))
    tracker.on_deleted({"version": 5, "timestamp": 1})
    assert tracker.exists is True
    assert tracker.reported == {"b": 1}
    assert tracker.lock_version() == 7


@pytest.mark.parametrize(
    ("method", "document"),
    [
        ("on_get_accepted", None),
        ("on_get_accepted", []),
        ("on_get_accepted", {"state": {}}),
        ("on_get_accepted", {"state": {}, "version": "3"}),
        ("on_get_accepted", {"state": {}, "version": -1}),
        ("on_get_accepted", {"state": {}, "version": True}),
        ("on_get_accepted", {"state": {}, "version": 2.0}),
        ("on_update_accepted", "x"),
        ("on_update_accepted", {"state": {"reported": {}}}),
        ("on_update_accepted", {"state": {"reported": [1]}, "version": 1}),
        ("on_update_accepted", {"state": {"desired": "x"}, "version": 1}),
        ("on_delta", {"state": {}}),
        ("on_delta", 42),
        ("on_deleted", {}),
        ("on_deleted", {"version": None}),
    ],
)
def test_tracker_malformed_documents(method: str, document: object) -> None:
    """Not a shadow document: ShadowProtocolError (a ValueError)."""
    tracker = ShadowTracker()
    with pytest.raises(ShadowProtocolError):
        getattr(tracker, method)(document)
    with pytest.raises(ValueError):
        getattr(tracker, method)(document)


def test_tracker_to_apply() -> None:
    """Only keys not yet handed over with the same value are returned (and recorded); a
    re-sent delta runs nothing again, a changed value runs again."""
    tracker = ShadowTracker()
    assert tracker.to_apply({"a": 1, "b": {"x": 1}}) == {"a": 1, "b": {"x": 1}}
    assert tracker.attempted == {"a": 1, "b": {"x": 1}}
    assert tracker.to_apply({"a": 1.0, "b": {"x": 1}}) == {}
    assert tracker.to_apply({"a": 2, "b": {"x": 1}, "c": 3}) == {"a": 2, "c": 3}
    assert tracker.to_apply({"a": True}) == {"a": True}
    assert tracker.to_apply({"b": {"x": 1, "y": 2}}) == {"b": {"x": 1, "y": 2}}
    assert tracker.to_apply({}) == {}


def test_tracker_forget_attempts() -> None:
    """Failed keys are tried again on the next delta; unknown keys are ignored."""
    tracker = ShadowTracker()
    tracker.to_apply({"a": 1, "b": 2})
    tracker.forget_attempts(["a", "zzz"])
    assert tracker.to_apply({"a": 1, "b": 2}) == {"a": 1}
    tracker.forget_attempts(frozenset({"a", "b"}))
    assert tracker.attempted == {}


def test_tracker_reapplies_after_key_left_delta() -> None:
    """A key that was in sync and is out of sync again is new work, not a re-sent delta."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(1, desired={"led": "on"}, delta={"led": "on"}))
    assert tracker.to_apply(tracker.delta) == {"led": "on"}
    tracker.on_get_accepted(get_doc(3, desired={"led": "on"}, reported={"led": "on"}))
    assert tracker.to_apply(tracker.delta) == {}
    tracker.on_delta({"state": {"led": "on"}, "version": 4})  # reported drifted to "off"
    assert tracker.to_apply(tracker.delta) == {"led": "on"}


def test_tracker_report_changes_accounts_for_queue() -> None:
    """A report is compared with reported as it will be once the queue is sent."""
    tracker = ShadowTracker()
    tracker.on_get_accepted(get_doc(1, reported={"a": 1, "b": 1, "n": {"x": 1}}))
    queue = ReportQueue()
    queue.add({"a": 2, "b": None})
    assert tracker.report_changes({"a": 2, "b": None}, queue) == {}
    assert tracker.report_changes({"a": 1}, queue) == {"a": 1}
    assert tracker.report_changes({"b": 1}, queue) == {"b": 1}
    assert tracker.report_changes({"n": {"x": 1.0}}, queue) == {}
    assert tracker.report_changes({"n": {"x": 2}}, ReportQueue()) == {"n": {"x": 2}}
    sealed = ReportQueue()
    sealed.add({"k": None})
    sealed.head_sealed = True
    sealed.add({"k": {"v": 1}})
    assert tracker.report_changes({"k": {"v": 1}}, sealed) == {}


def test_tracker_lock_version() -> None:
    """Locking only on an existing shadow; None before anything is known."""
    tracker = ShadowTracker()
    assert tracker.lock_version() is None
    tracker.on_delta({"state": {"a": 1}, "version": 9})
    assert tracker.lock_version() == 9
    tracker.on_get_missing()
    assert tracker.lock_version() is None


# ---------------------------------------------------------------- after_report


def _doubling(n: int) -> float:
    return float(2**n)


def test_an_accepted_report_resets_the_streaks() -> None:
    decision = after_report({"version": 3}, conflicts=2, failures=4, backoff=_doubling)
    assert decision == ReportDecision(NextStep.SENT)


def test_a_first_conflict_resyncs_at_once_and_the_next_ones_back_off() -> None:
    conflict = Rejection(409, "Version conflict", None)
    first = after_report(conflict, conflicts=0, failures=0, backoff=_doubling)
    assert (first.step, first.delay, first.conflicts) == (NextStep.RESYNC, 0.0, 1)
    second = after_report(conflict, conflicts=1, failures=0, backoff=_doubling)
    assert (second.step, second.delay, second.conflicts) == (NextStep.RESYNC, 2.0, 2)


@pytest.mark.parametrize("code", [429, 500, 503, 504])
def test_throttling_and_service_failures_are_retried_with_backoff(code: int) -> None:
    decision = after_report(Rejection(code, "x", None), conflicts=1, failures=2, backoff=_doubling)
    assert (decision.step, decision.delay) == (NextStep.RETRY, 8.0)
    assert (decision.conflicts, decision.failures) == (1, 3)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413])
def test_a_report_refused_for_good_is_parked(code: int) -> None:
    decision = after_report(Rejection(code, "x", None), conflicts=0, failures=1, backoff=_doubling)
    assert decision == ReportDecision(NextStep.PARK, 0.0, 0, 1)
