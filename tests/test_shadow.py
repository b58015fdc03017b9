"""Pure Device Shadow logic (broker/shadow.py): merge, delta, metadata, versions, errors."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from broker.shadow import (
    DEFAULT_LIMITS,
    ShadowDocument,
    ShadowError,
    ShadowLimits,
    UpdateResult,
    apply_update,
    client_token_of,
    compute_delta,
    delete_result,
    get_document,
    parse_request,
    validate_shadow_name,
    validate_thing_name,
)

pytestmark = pytest.mark.unit

T0 = 1_700_000_000
T1 = T0 + 60
T2 = T0 + 120


def encode(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def update(
    current: ShadowDocument | None,
    body: Any,
    *,
    now: int = T1,
    limits: ShadowLimits = DEFAULT_LIMITS,
    deleted_version: int = 0,
) -> UpdateResult:
    result = apply_update(
        current, encode(body), now=now, limits=limits, deleted_version=deleted_version
    )
    # Every payload must be publishable as JSON, and the stored form must round-trip.
    for payload in (result.accepted, result.delta, result.documents):
        json.dumps(payload, allow_nan=False)
    assert ShadowDocument.from_json(result.document.to_json()) == result.document
    return result


def make(state: dict[str, Any], *, now: int = T0) -> ShadowDocument:
    """A shadow at version 1 holding ``state`` (desired/reported), written at ``now``."""
    return update(None, {"state": state}, now=now).document


def rejected(
    current: ShadowDocument | None,
    body: Any,
    code: int,
    message: str,
    *,
    limits: ShadowLimits = DEFAULT_LIMITS,
    deleted_version: int = 0,
) -> ShadowError:
    before = copy.deepcopy(current)
    with pytest.raises(ShadowError) as caught:
        apply_update(current, encode(body), now=T1, limits=limits, deleted_version=deleted_version)
    assert (caught.value.code, caught.value.message) == (code, message)
    assert current == before  # a rejected update never touches the document
    return caught.value


def stamp(now: int) -> dict[str, int]:
    return {"timestamp": now}


# ------------------------------------------------------------------------ merge-rule table


def test_partial_update_changes_only_the_keys_sent_and_merges_objects_recursively() -> None:
    doc = make({"desired": {"a": 1, "b": {"x": 1, "y": 2}, "c": "keep"}, "reported": {"a": 0}})
    result = update(doc, {"state": {"desired": {"a": 2, "b": {"y": 3, "z": 4}}}})
    assert result.document.state == {
        "desired": {"a": 2, "b": {"x": 1, "y": 3, "z": 4}, "c": "keep"},
        "reported": {"a": 0},
    }
    assert result.document.metadata == {
        "desired": {
            "a": stamp(T1),
            "b": {"x": stamp(T0), "y": stamp(T1), "z": stamp(T1)},
            "c": stamp(T0),
        },
        "reported": {"a": stamp(T0)},
    }


def test_null_deletes_a_top_level_key_and_its_metadata() -> None:
    doc = make({"desired": {"a": 1, "b": 2}})
    result = update(doc, {"state": {"desired": {"a": None}}})
    assert result.document.state == {"desired": {"b": 2}}
    assert result.document.metadata == {"desired": {"b": stamp(T0)}}


@pytest.mark.parametrize(
    ("patch", "state", "metadata"),
    [
        (
            {"l1": {"l2": None}},
            {"l1": {"k": 1}, "top": 0},
            {"l1": {"k": stamp(T0)}, "top": stamp(T0)},
        ),
        (
            {"l1": {"l2": {"l3": None}}},
            {"l1": {"l2": {"m": 2}, "k": 1}, "top": 0},
            {"l1": {"l2": {"m": stamp(T0)}, "k": stamp(T0)}, "top": stamp(T0)},
        ),
        (
            {"l1": {"l2": {"l3": {"l4": None}}}},
            {"l1": {"l2": {"l3": {"n": 3}, "m": 2}, "k": 1}, "top": 0},
            {
                "l1": {"l2": {"l3": {"n": stamp(T0)}, "m": stamp(T0)}, "k": stamp(T0)},
                "top": stamp(T0),
            },
        ),
    ],
    ids=["level2", "level3", "level4"],
)
def test_null_deletes_nested_keys_at_each_level(
    patch: dict[str, Any], state: dict[str, Any], metadata: dict[str, Any]
) -> None:
    doc = make({"desired": {"l1": {"l2": {"l3": {"l4": 4, "n": 3}, "m": 2}, "k": 1}, "top": 0}})
    result = update(doc, {"state": {"desired": patch}})
    assert result.document.state == {"desired": state}
    assert result.document.metadata == {"desired": metadata}


def test_null_for_a_missing_key_is_accepted_and_changes_nothing_but_the_version() -> None:
    doc = make({"desired": {"a": 1}})
    result = update(doc, {"state": {"desired": {"ghost": None, "b": {"ghost": None}}}})
    assert result.document.state == doc.state
    assert result.document.metadata == doc.metadata
    assert result.document.version == 2


@pytest.mark.parametrize("section", ["desired", "reported"])
def test_section_null_removes_the_whole_section(section: str) -> None:
    doc = make({"desired": {"a": 1}, "reported": {"a": 2}})
    other = "reported" if section == "desired" else "desired"
    result = update(doc, {"state": {section: None}})
    assert result.document.state == {other: doc.state[other]}
    assert result.document.metadata == {other: doc.metadata[other]}
    assert result.accepted["state"] == {section: None}
    assert result.accepted["metadata"] == {section: stamp(T1)}


def test_state_null_clears_both_sections_but_the_shadow_survives_with_a_new_version() -> None:
    doc = make({"desired": {"a": 1}, "reported": {"a": 2}})
    result = update(doc, {"state": None, "clientToken": "c"})
    assert result.document == ShadowDocument(state={}, metadata={}, version=2)
    assert result.accepted == {
        "state": None,
        "metadata": {},
        "version": 2,
        "timestamp": T1,
        "clientToken": "c",
    }
    assert result.delta is None
    assert result.documents["previous"] == doc.snapshot()
    assert result.documents["current"] == {"state": {}, "metadata": {}, "version": 2}
    got = get_document(result.document, now=T2, client_token=None)
    assert got == {"state": {}, "metadata": {}, "version": 2, "timestamp": T2}
    assert update(result.document, {"state": {"reported": {"b": 1}}}).document.version == 3


def test_arrays_are_replaced_whole_with_one_metadata_timestamp() -> None:
    doc = make({"desired": {"colors": ["RED", "GREEN", "BLUE"], "grid": [[1, 2], [3]]}})
    assert doc.metadata == {"desired": {"colors": stamp(T0), "grid": stamp(T0)}}
    result = update(doc, {"state": {"desired": {"colors": ["RED"]}}})
    assert result.document.state == {"desired": {"colors": ["RED"], "grid": [[1, 2], [3]]}}
    assert result.document.metadata == {"desired": {"colors": stamp(T1), "grid": stamp(T0)}}
    assert result.accepted["metadata"] == {"desired": {"colors": stamp(T1)}}


@pytest.mark.parametrize(
    "value",
    [[None], ["RED", None], [[1, None]], [{"a": None}], [{"a": [None]}], [[{"b": {"c": None}}]]],
)
def test_arrays_holding_null_are_rejected(value: list[Any]) -> None:
    doc = make({"desired": {"colors": ["RED"]}})
    rejected(doc, {"state": {"desired": {"colors": value}}}, 400, "Invalid JSON")
    rejected(None, {"state": {"reported": {"x": {"colors": value}}}}, 400, "Invalid JSON")


@pytest.mark.parametrize(
    ("old", "new", "new_meta"),
    [
        ({"x": 1}, 5, stamp(T1)),
        ({"x": 1}, [1, 2], stamp(T1)),
        (5, {"x": 1}, {"x": stamp(T1)}),
        ("s", [1], stamp(T1)),
        ([1], {"y": [2]}, {"y": stamp(T1)}),
        (True, "on", stamp(T1)),
    ],
    ids=["object-scalar", "object-array", "scalar-object", "scalar-array", "array-object", "t"],
)
def test_type_change_replaces_the_old_value(old: Any, new: Any, new_meta: Any) -> None:
    doc = make({"reported": {"v": old, "other": 1}})
    result = update(doc, {"state": {"reported": {"v": new}}})
    assert result.document.state == {"reported": {"v": new, "other": 1}}
    assert result.document.metadata == {"reported": {"v": new_meta, "other": stamp(T0)}}


def test_section_emptied_by_nulls_is_dropped() -> None:
    doc = make({"desired": {"a": 1, "b": {"c": 2}}, "reported": {"a": 1}})
    result = update(doc, {"state": {"desired": {"a": None, "b": None}}})
    assert result.document.state == {"reported": {"a": 1}}
    assert result.document.metadata == {"reported": {"a": stamp(T0)}}
    assert "desired" not in get_document(result.document, now=T2, client_token=None)["state"]


def test_nested_object_emptied_by_nulls_is_pruned_up_to_the_section() -> None:
    doc = make({"desired": {"a": {"b": {"c": 1}}, "keep": 1}, "reported": {"r": 1}})
    result = update(doc, {"state": {"desired": {"a": {"b": {"c": None}}}}})
    assert result.document.state == {"desired": {"keep": 1}, "reported": {"r": 1}}
    assert result.document.metadata["desired"] == {"keep": stamp(T0)}
    result = update(result.document, {"state": {"desired": {"keep": None}}})
    assert result.document.state == {"reported": {"r": 1}}


def test_new_object_with_only_nulls_or_empty_objects_is_not_stored() -> None:
    result = update(None, {"state": {"desired": {"a": {"b": None, "c": {}}, "d": 1}}})
    assert result.document.state == {"desired": {"d": 1}}
    assert result.document.metadata == {"desired": {"d": stamp(T1)}}
    # the echo is what was sent, nulls and empty objects included
    assert result.accepted["state"] == {"desired": {"a": {"b": None, "c": {}}, "d": 1}}
    assert result.accepted["metadata"] == {
        "desired": {"a": {"b": stamp(T1), "c": {}}, "d": stamp(T1)}
    }


def test_empty_object_value_merges_nothing_and_is_never_stored() -> None:
    doc = make({"desired": {"obj": {"x": 1}, "num": 5, "arr": [1]}, "reported": {"r": 1}})
    result = update(doc, {"state": {"desired": {"obj": {}, "missing": {}}}})
    assert result.document.state == doc.state  # merge of {} into an object: no change
    result = update(doc, {"state": {"desired": {"num": {}, "arr": {}}}})
    # a scalar/array replaced by an empty object: the empty object is pruned → key removed
    assert result.document.state == {"desired": {"obj": {"x": 1}}, "reported": {"r": 1}}
    result = update(doc, {"state": {"desired": {}, "reported": {}}})
    assert result.document.state == doc.state
    assert result.document.version == 2


def test_first_accepted_update_creates_the_shadow_at_version_1_without_previous() -> None:
    result = update(None, {"state": {"reported": {"Color": "green"}}, "clientToken": "c3ba"})
    assert result.document.version == 1
    assert result.accepted == {
        "clientToken": "c3ba",
        "state": {"reported": {"Color": "green"}},
        "metadata": {"reported": {"Color": stamp(T1)}},
        "timestamp": T1,
        "version": 1,
    }
    assert result.documents == {
        "current": {
            "state": {"reported": {"Color": "green"}},
            "metadata": {"reported": {"Color": stamp(T1)}},
            "version": 1,
        },
        "timestamp": T1,
        "clientToken": "c3ba",
    }


def test_state_size_counts_the_whole_stored_state_in_utf8_excluding_metadata() -> None:
    limits = ShadowLimits(max_state_bytes=40)
    # {"a":"xxxxxxxxxx"} is 18 bytes; {"b":"éééé"} is 16 bytes (é is 2 bytes in UTF-8)
    doc = update(None, {"state": {"desired": {"a": "x" * 10}}}, limits=limits).document
    body = {"state": {"reported": {"b": "é" * 4}}}
    assert update(doc, body, limits=limits).document.version == 2  # 34 bytes
    body = {"state": {"reported": {"b": "é" * 7}}}  # 18 + 22 = 40 bytes: exactly the limit
    full = update(doc, body, limits=limits).document
    body = {"state": {"reported": {"b": "é" * 7 + "z"}}}  # 41 bytes: a 1-key request
    rejected(doc, body, 413, "The payload exceeds the maximum size allowed", limits=limits)
    # deletions always fit again; metadata (much larger than 40 bytes) is not counted
    assert update(full, {"state": {"reported": {"b": None}}}, limits=limits).document.state == {
        "desired": {"a": "x" * 10}
    }


def test_default_state_limit_is_8192_bytes() -> None:
    fits = {"state": {"desired": {"k": "x" * (8192 - len('{"k":""}'))}}}
    doc = update(None, fits).document
    assert len(json.dumps(doc.state["desired"], separators=(",", ":"))) == 8192
    error = rejected(
        doc,
        {"state": {"reported": {"r": 1}}, "clientToken": "big"},
        413,
        "The payload exceeds the maximum size allowed",
    )
    assert error.client_token == "big"


def test_oversize_payload_is_413_before_anything_else() -> None:
    limits = ShadowLimits(max_payload_bytes=100)
    body = json.dumps({"state": {"desired": {"a": "x" * 60}}, "clientToken": "tok"}).encode()
    assert len(body) > 100
    error = rejected(None, body, 413, "The payload exceeds the maximum size allowed", limits=limits)
    assert error.client_token == "tok"  # best effort, so the rejection can be correlated
    assert update(None, {"state": {}}, limits=limits).document.version == 1
    too_big = b"\xff" * (DEFAULT_LIMITS.max_payload_bytes + 1)
    rejected(None, too_big, 413, "The payload exceeds the maximum size allowed")


def nested(levels: int) -> dict[str, Any]:
    """A desired/reported object of exactly ``levels`` levels (the object itself is level 1)."""
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        node = {"n": node}
    return node


@pytest.mark.parametrize("section", ["desired", "reported"])
def test_depth_limit_boundary(section: str) -> None:
    assert update(None, {"state": {section: nested(6)}}).document.state == {section: nested(6)}
    rejected(
        None,
        {"state": {section: nested(7)}},
        400,
        "JSON contains too many levels of nesting; maximum is 6",
    )


def test_depth_counts_arrays_as_levels_and_is_configurable() -> None:
    six_with_array = {"a": {"b": {"c": {"d": {"e": [1, 2]}}}}}  # array is level 6
    assert update(None, {"state": {"desired": six_with_array}}).document.version == 1
    seven_with_array = {"a": {"b": {"c": {"d": {"e": [[1]]}}}}}
    rejected(
        None,
        {"state": {"desired": seven_with_array}},
        400,
        "JSON contains too many levels of nesting; maximum is 6",
    )
    limits = ShadowLimits(max_depth=3)
    assert update(None, {"state": {"desired": nested(3)}}, limits=limits)
    rejected(
        None,
        {"state": {"desired": {"a": {"b": [{"c": 1}]}}}},
        400,
        "JSON contains too many levels of nesting; maximum is 3",
        limits=limits,
    )
    limits = ShadowLimits(max_depth=8)
    assert update(None, {"state": {"desired": nested(8)}}, limits=limits)
    rejected(
        None,
        {"state": {"desired": nested(9)}},
        400,
        "JSON contains too many levels of nesting; maximum is 8",
        limits=limits,
    )


def test_depth_limit_also_applies_to_deletions() -> None:
    doc = make({"desired": nested(6)})
    body = {"state": {"desired": {"n": {"n": {"n": {"n": {"n": {"leaf": {"x": None}}}}}}}}}
    rejected(doc, body, 400, "JSON contains too many levels of nesting; maximum is 6")


# --------------------------------------------------------------------------------- delta


@pytest.mark.parametrize(
    ("desired", "reported", "delta"),
    [
        (1, 1.0, None),
        (1.0, 1, None),
        (0, 0.0, None),
        (1, 2, 1),
        (True, 1, True),
        (1, True, 1),
        (False, 0, False),
        (0, False, 0),
        (True, True, None),
        ([1, 2], [1.0, 2.0], None),
        ([True], [1], [True]),
        ([1, 2], [2, 1], [1, 2]),
        ([1], [1, 1], [1]),
        ([{"a": 1}], [{"a": 1.0}], None),
        ([{"a": 1}], [{"a": 1, "b": 2}], [{"a": 1}]),
        ("1", 1, "1"),
        ({"x": 1}, 1, {"x": 1}),
        (2**53 + 1, float(2**53), 2**53 + 1),
    ],
)
def test_delta_equality(desired: Any, reported: Any, delta: Any) -> None:
    expected = {} if delta is None else {"v": delta}
    assert compute_delta({"v": desired}, {"v": reported}) == expected
    result = update(make({"desired": {"v": desired}}), {"state": {"reported": {"v": reported}}})
    assert (result.delta is None) == (delta is None)
    if delta is not None:
        assert result.delta is not None
        assert result.delta["state"] == expected


def test_compute_delta_rules() -> None:
    desired = {
        "same": 1,
        "diff": 2,
        "only_desired": {"deep": [1]},
        "obj": {"same": "a", "diff": {"x": 1, "y": 2}},
        "null_reported": 7,
    }
    reported = {
        "same": 1,
        "diff": 3,
        "only_reported": 9,
        "obj": {"same": "a", "diff": {"x": 1, "y": 3}, "extra": 0},
        "null_reported": None,
    }
    assert compute_delta(desired, reported) == {
        "diff": 2,
        "only_desired": {"deep": [1]},
        "obj": {"diff": {"y": 2}},
        "null_reported": 7,
    }
    assert compute_delta(desired, {}) == desired
    assert compute_delta({}, reported) == {}
    assert compute_delta({"gone": None}, {"gone": 1}) == {}


def test_delta_after_a_reported_only_update_carries_every_out_of_sync_key() -> None:
    doc = make({"desired": {"Status": "Great", "Color": "red", "n": {"a": 1, "b": 2}}}, now=T0)
    doc = update(
        doc, {"state": {"reported": {"Status": "Great", "Color": "red", "n": {"a": 1, "b": 2}}}}
    ).document
    result = update(doc, {"state": {"reported": {"Status": "Awful", "n": {"b": 3}}}}, now=T2)
    assert result.delta == {
        "state": {"Status": "Great", "n": {"b": 2}},
        # timestamps of the desired values, not of this update
        "metadata": {"Status": stamp(T0), "n": {"b": stamp(T0)}},
        "version": 3,
        "timestamp": T2,
    }
    # another reported-only update leaving the delta unchanged still produces it
    again = update(result.document, {"state": {"reported": {"Color": "red"}}, "clientToken": "k"})
    assert again.delta is not None
    assert again.delta["state"] == {"Status": "Great", "n": {"b": 2}}
    assert again.delta["clientToken"] == "k"
    assert again.delta["version"] == 4


def test_delta_is_none_when_in_sync_or_without_desired() -> None:
    doc = make({"desired": {"a": 1}})
    assert update(doc, {"state": {"reported": {"a": 1, "b": 2}}}).delta is None
    assert update(None, {"state": {"reported": {"a": 1}}}).delta is None
    assert update(doc, {"state": {"desired": None}}).delta is None


def test_delta_of_a_desired_key_deleted_from_reported() -> None:
    doc = make({"desired": {"a": 1}, "reported": {"a": 1}})
    result = update(doc, {"state": {"reported": {"a": None}}})
    assert result.delta is not None
    assert result.delta["state"] == {"a": 1}
    assert result.delta["metadata"] == {"a": stamp(T0)}


def test_delta_with_no_reported_section_is_the_whole_desired() -> None:
    result = update(None, {"state": {"desired": {"a": {"b": [1]}, "c": 2}}, "clientToken": "t"})
    assert result.delta == {
        "state": {"a": {"b": [1]}, "c": 2},
        "metadata": {"a": {"b": stamp(T1)}, "c": stamp(T1)},
        "version": 1,
        "timestamp": T1,
        "clientToken": "t",
    }


# ------------------------------------------------------------------------------ metadata


def test_metadata_timestamps_only_for_written_leaves() -> None:
    doc = make({"desired": {"a": 1, "b": {"c": 1, "d": 2}}, "reported": {"a": 1}})
    result = update(doc, {"state": {"desired": {"b": {"d": 3}}}}, now=T2)
    assert result.document.metadata == {
        "desired": {"a": stamp(T0), "b": {"c": stamp(T0), "d": stamp(T2)}},
        "reported": {"a": stamp(T0)},
    }
    # rewriting a leaf with the same value is still a write
    result = update(result.document, {"state": {"reported": {"a": 1}}}, now=T2 + 1)
    assert result.document.metadata["reported"] == {"a": stamp(T2 + 1)}


def test_accepted_metadata_mirrors_the_request_including_null_leaves() -> None:
    doc = make({"desired": {"a": 1, "b": {"c": 1}}})
    result = update(doc, {"state": {"desired": {"a": None, "b": {"c": None, "e": [1]}}}})
    assert result.accepted["state"] == {"desired": {"a": None, "b": {"c": None, "e": [1]}}}
    assert result.accepted["metadata"] == {
        "desired": {"a": stamp(T1), "b": {"c": stamp(T1), "e": stamp(T1)}}
    }
    assert result.document.metadata == {"desired": {"b": {"e": stamp(T1)}}}


def test_float_now_is_stored_as_integer_seconds() -> None:
    result = apply_update(None, b'{"state":{"desired":{"a":1}}}', now=T1 + 0.9)
    assert result.document.metadata == {"desired": {"a": stamp(T1)}}
    assert result.accepted["timestamp"] == T1


# ------------------------------------------------------------------------------ versions


def test_version_increments_by_one_per_accepted_update() -> None:
    doc = None
    for expected in range(1, 6):
        result = update(doc, {"state": {"reported": {"n": expected}}})
        assert result.document.version == expected
        assert result.accepted["version"] == expected
        assert result.documents["current"]["version"] == expected
        if doc is not None:
            assert result.documents["previous"]["version"] == expected - 1
        doc = result.document


def test_matching_version_is_accepted() -> None:
    doc = update(make({"desired": {"a": 1}}), {"state": {"desired": {"a": 2}}}).document
    assert update(doc, {"state": {"desired": {"a": 3}}, "version": 2}).document.version == 3
    assert update(doc, {"state": {"desired": {"a": 3}}, "version": None}).document.version == 3


@pytest.mark.parametrize("version", [0, 1, 3, 100])
def test_version_conflict_leaves_the_document_unchanged(version: int) -> None:
    doc = update(make({"desired": {"a": 1}}), {"state": {"desired": {"a": 2}}}).document
    error = rejected(
        doc,
        {"state": {"desired": {"a": 9}}, "version": version, "clientToken": "v"},
        409,
        "Version conflict",
    )
    assert error.client_token == "v"
    assert error.rejected(error.client_token, T2) == {
        "code": 409,
        "message": "Version conflict",
        "timestamp": T2,
        "clientToken": "v",
    }


@pytest.mark.parametrize("version", [-1, 1.5, 2.0, True, False, "2", [2], {"v": 2}])
def test_invalid_version_is_400(version: Any) -> None:
    doc = make({"desired": {"a": 1}})
    rejected(doc, {"state": {"desired": {"a": 2}}, "version": version}, 400, "Invalid version")
    rejected(None, {"state": {"desired": {"a": 2}}, "version": version}, 400, "Invalid version")


def test_version_on_a_shadow_that_does_not_exist() -> None:
    assert update(None, {"state": {"desired": {"a": 1}}, "version": 0}).document.version == 1
    rejected(None, {"state": {"desired": {"a": 1}}, "version": 1}, 409, "Version conflict")
    # after a delete at version 17, the old version is a stale view, 0 means "no shadow"
    body = {"state": {"desired": {"a": 1}}, "version": 17}
    rejected(None, body, 409, "Version conflict", deleted_version=17)
    body = {"state": {"desired": {"a": 1}}, "version": 0}
    assert update(None, body, deleted_version=17).document.version == 18


def test_version_continues_after_delete() -> None:
    doc = make({"desired": {"a": 1}})
    for _ in range(16):
        doc = update(doc, {"state": {"reported": {"a": 1}}}).document
    assert doc.version == 17
    assert delete_result(doc, now=T2, client_token="d") == {
        "version": 17,
        "timestamp": T2,
        "clientToken": "d",
    }
    recreated = update(None, {"state": {"reported": {"b": 2}}}, deleted_version=doc.version)
    assert recreated.document.version == 18
    assert recreated.document.state == {"reported": {"b": 2}}  # nothing of the old state
    assert "previous" not in recreated.documents
    assert recreated.accepted["version"] == 18
    # a tombstone that expired: the service passes 0 and the shadow starts over
    assert update(None, {"state": None}, deleted_version=0).document.version == 1


# ---------------------------------------------------------------------------- clientToken


def test_client_token_is_echoed_in_every_payload_kind() -> None:
    doc = make({"reported": {"a": 1}})
    result = update(doc, {"state": {"desired": {"a": 2}}, "clientToken": "tok-1"})
    assert result.accepted["clientToken"] == "tok-1"
    assert result.delta is not None and result.delta["clientToken"] == "tok-1"
    assert result.documents["clientToken"] == "tok-1"
    assert get_document(result.document, now=T2, client_token="tok-2")["clientToken"] == "tok-2"
    assert delete_result(result.document, now=T2, client_token="tok-3")["clientToken"] == "tok-3"
    error = rejected(
        doc,
        {"state": {"desired": "x"}, "clientToken": "tok-4"},
        400,
        "Desired node must be an object",
    )
    assert error.client_token == "tok-4"
    assert error.rejected(error.client_token, T2)["clientToken"] == "tok-4"


def test_payloads_without_a_client_token_have_no_client_token_field() -> None:
    result = update(make({"reported": {"a": 1}}), {"state": {"desired": {"a": 2}}})
    assert "clientToken" not in result.accepted
    assert result.delta is not None and "clientToken" not in result.delta
    assert "clientToken" not in result.documents
    assert "clientToken" not in get_document(result.document, now=T2, client_token=None)
    assert "clientToken" not in delete_result(result.document, now=T2, client_token=None)
    error = rejected(None, {"state": 1}, 400, "State node must be an object")
    assert error.client_token is None
    assert error.rejected(None, T2) == {
        "code": 400,
        "message": "State node must be an object",
        "timestamp": T2,
    }


@pytest.mark.parametrize(
    ("token", "ok"),
    [
        ("a" * 64, True),
        ("a" * 65, False),
        ("é" * 32, True),  # 64 bytes in UTF-8
        ("é" * 33, False),  # 33 characters, 66 bytes
        ("€" * 21 + "a", True),  # 3-byte characters: 64 bytes
        ("€" * 22, False),  # 66 bytes
        ("", True),
    ],
)
def test_client_token_byte_limit(token: str, ok: bool) -> None:
    body = {"state": {"desired": {"a": 1}}, "clientToken": token}
    if ok:
        assert update(None, body).accepted["clientToken"] == token
        assert parse_request(encode({"clientToken": token})) == ({"clientToken": token}, token)
    else:
        error = rejected(None, body, 400, "Invalid clientToken")
        assert error.client_token is None  # an invalid token is never echoed
        with pytest.raises(ShadowError, match="Invalid clientToken"):
            parse_request(encode({"clientToken": token}))


def test_client_token_limit_is_configurable() -> None:
    limits = ShadowLimits(max_client_token_bytes=4)
    body = {"state": {"desired": {"a": 1}}, "clientToken": "abcde"}
    rejected(None, body, 400, "Invalid clientToken", limits=limits)


@pytest.mark.parametrize("token", [1, 1.5, True, ["x"], {"x": 1}])
def test_client_token_must_be_a_string(token: Any) -> None:
    rejected(None, {"state": {}, "clientToken": token}, 400, "Invalid clientToken")


def test_client_token_of_is_best_effort() -> None:
    assert client_token_of(b'{"clientToken":"abc","state":5}') == "abc"
    assert client_token_of(b'{"clientToken": "a\\"b", "state": {') == 'a"b'  # broken JSON
    assert client_token_of(b'{"state":{},"clientToken":"x\xff"}') is None
    assert client_token_of(b'{"clientToken":"ok"} \xff') == "ok"  # non-UTF-8 elsewhere
    assert client_token_of(b'{"clientToken":"' + b"a" * 65 + b'"}') is None
    assert client_token_of(b'{"clientToken":7}') is None
    assert client_token_of(b"[1,2]") is None
    assert client_token_of(b"") is None
    assert client_token_of(b"not json") is None


def test_rejections_of_unreadable_requests_still_echo_the_token() -> None:
    error = rejected(None, b'{"clientToken":"t1","state":{', 400, "Invalid JSON")
    assert error.client_token == "t1"
    body = b'{"clientToken":"t2","state":{"desired":{"a":"\xff"}}}'
    error = rejected(
        None, body, 415, "Unsupported documented encoding; supported encoding is UTF-8"
    )
    assert error.client_token == "t2"
    with pytest.raises(ShadowError) as caught:
        parse_request(b'{"clientToken":"t3",')
    assert (caught.value.code, caught.value.client_token) == (400, "t3")


# -------------------------------------------------------------------- request validation


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "Invalid JSON"),
        (b"   ", "Invalid JSON"),
        (b"{", "Invalid JSON"),
        (b"{'state': {}}", "Invalid JSON"),
        (b'{"state":{}} {}', "Invalid JSON"),
        (b"[]", "Invalid JSON"),
        (b'"state"', "Invalid JSON"),
        (b"null", "Invalid JSON"),
        (b'{"state":{"desired":{"a":NaN}}}', "Invalid JSON"),
        (b'{"state":{"desired":{"a":Infinity}}}', "Invalid JSON"),
        (b'{"state":{"desired":{"a":-Infinity}}}', "Invalid JSON"),
        (b'{"state":{"desired":{"a":1e400}}}', "Invalid JSON"),
        (b'{"state":{"desired":{"a":"\\ud800"}}}', "Invalid JSON"),
        (b'{"state":{"desired":{"\\udc00":null}}}', "Invalid JSON"),
        (b"\xef\xbb\xbf{}", "Invalid JSON"),
        (b"[" * 60_000 + b"]" * 60_000, "Invalid JSON"),
        (b"{}", "Missing required node: state"),
        (b'{"clientToken":"x","version":1}', "Missing required node: state"),
        (b'{"state":[]}', "State node must be an object"),
        (b'{"state":"on"}', "State node must be an object"),
        (b'{"state":1}', "State node must be an object"),
        (b'{"state":true}', "State node must be an object"),
        (b'{"state":{"desired":1}}', "Desired node must be an object"),
        (b'{"state":{"desired":[{"a":1}]}}', "Desired node must be an object"),
        (b'{"state":{"desired":"x","reported":{}}}', "Desired node must be an object"),
        (b'{"state":{"reported":false}}', "Reported node must be an object"),
        (b'{"state":{"reported":[]}}', "Reported node must be an object"),
        (b'{"state":{"other":{}}}', "State contains an invalid node"),
        (b'{"state":{"desired":{"a":1},"metadata":{}}}', "State contains an invalid node"),
        (b'{"state":{"Desired":{"a":1}}}', "State contains an invalid node"),
    ],
)
def test_malformed_update_requests(body: bytes, message: str) -> None:
    doc = make({"desired": {"a": 1}})
    rejected(doc, body, 400, message)


@pytest.mark.parametrize("body", [b"\xff", b'{"state":{"desired":{"a":"\xc3"}}}', b"\xed\xa0\x80"])
def test_non_utf8_is_415(body: bytes) -> None:
    rejected(None, body, 415, "Unsupported documented encoding; supported encoding is UTF-8")


def test_utf16_is_not_accepted_as_json() -> None:
    body = '{"state":{"desired":{"a":1}}}'.encode("utf-16")
    rejected(None, body, 415, "Unsupported documented encoding; supported encoding is UTF-8")


def test_client_sent_delta_is_stripped_and_other_top_level_keys_ignored() -> None:
    doc = make({"desired": {"a": 1}})
    body = {
        "state": {"reported": {"a": 2}, "delta": {"a": 99}},
        "metadata": {"reported": {"a": {"timestamp": 1}}},
        "timestamp": 5,
        "whatever": True,
    }
    result = update(doc, body)
    assert result.accepted["state"] == {"reported": {"a": 2}}
    assert result.document.state == {"desired": {"a": 1}, "reported": {"a": 2}}
    assert result.document.metadata["reported"] == {"a": stamp(T1)}
    assert result.delta is not None and result.delta["state"] == {"a": 1}
    only_delta = update(doc, {"state": {"delta": {"a": 5}}})
    assert only_delta.document.state == doc.state
    assert only_delta.document.version == 2
    assert only_delta.accepted["state"] == {}


def test_empty_state_is_an_accepted_no_op_that_can_create_an_empty_shadow() -> None:
    result = update(None, {"state": {}, "clientToken": "e"})
    assert result.document == ShadowDocument(state={}, metadata={}, version=1)
    assert result.accepted == {
        "state": {},
        "metadata": {},
        "version": 1,
        "timestamp": T1,
        "clientToken": "e",
    }
    assert result.delta is None


def test_successful_updates_never_mutate_the_current_document() -> None:
    doc = make({"desired": {"a": {"b": 1, "c": [1]}, "d": 1}, "reported": {"a": {"b": 2}}})
    before = copy.deepcopy(doc)
    result = update(doc, {"state": {"desired": {"a": {"b": None, "c": [2]}, "d": None, "e": 1}}})
    update(doc, {"state": None})
    update(doc, {"state": {"reported": None, "desired": {"a": 5}}})
    assert doc == before
    assert result.documents["previous"] == before.snapshot()
    assert result.document.state == {
        "desired": {"a": {"c": [2]}, "e": 1},
        "reported": {"a": {"b": 2}},
    }


def test_documents_payload_holds_previous_and_current_snapshots() -> None:
    doc = make({"desired": {"a": 1}})
    result = update(doc, {"state": {"reported": {"a": 1}}, "clientToken": "dd"}, now=T2)
    assert result.documents == {
        "previous": {
            "state": {"desired": {"a": 1}},
            "metadata": {"desired": {"a": stamp(T0)}},
            "version": 1,
        },
        "current": {
            "state": {"desired": {"a": 1}, "reported": {"a": 1}},
            "metadata": {"desired": {"a": stamp(T0)}, "reported": {"a": stamp(T2)}},
            "version": 2,
        },
        "timestamp": T2,
        "clientToken": "dd",
    }


# ---------------------------------------------------------------------------- get/delete


@pytest.mark.parametrize(
    ("payload", "token"),
    [
        (b"", None),
        (b"  \n", None),
        (b"{}", None),
        (b'{"clientToken":"x"}', "x"),
        (b'{"clientToken":null}', None),
        (b'{"clientToken":"x","other":1}', "x"),
    ],
)
def test_parse_get_delete_requests(payload: bytes, token: str | None) -> None:
    request, client_token = parse_request(payload, DEFAULT_LIMITS)
    assert client_token == token
    assert request == (json.loads(payload) if payload.strip() else {})


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"{", 400, "Invalid JSON"),
        (b"[]", 400, "Invalid JSON"),
        (b"5", 400, "Invalid JSON"),
        (b'{"clientToken":5}', 400, "Invalid clientToken"),
        (b'{"clientToken":"' + b"a" * 65 + b'"}', 400, "Invalid clientToken"),
        (b"\xfe\xff", 415, "Unsupported documented encoding; supported encoding is UTF-8"),
        (b" " * 200, 413, "The payload exceeds the maximum size allowed"),
    ],
)
def test_parse_request_errors(payload: bytes, code: int, message: str) -> None:
    with pytest.raises(ShadowError) as caught:
        parse_request(payload, ShadowLimits(max_payload_bytes=100))
    assert (caught.value.code, caught.value.message) == (code, message)


def test_get_document_includes_delta_only_when_not_empty() -> None:
    doc = make({"desired": {"Status": "Great", "Color": "red"}, "reported": {"Status": "Awful"}})
    got = get_document(doc, now=T2, client_token="bcef")
    assert got == {
        "state": {
            "desired": {"Status": "Great", "Color": "red"},
            "reported": {"Status": "Awful"},
            "delta": {"Status": "Great", "Color": "red"},
        },
        "metadata": {
            "desired": {"Status": stamp(T0), "Color": stamp(T0)},
            "reported": {"Status": stamp(T0)},
        },
        "version": 1,
        "timestamp": T2,
        "clientToken": "bcef",
    }
    assert "delta" not in doc.state  # the stored document is not touched
    synced = update(doc, {"state": {"reported": {"Status": "Great", "Color": "red"}}}).document
    got = get_document(synced, now=T2, client_token=None)
    assert set(got["state"]) == {"desired", "reported"}
    assert set(got["metadata"]) == {"desired", "reported"}


def test_get_document_of_a_reported_only_shadow() -> None:
    doc = make({"reported": {"temp": 55}})
    got = get_document(doc, now=T2, client_token=None)
    assert got["state"] == {"reported": {"temp": 55}}
    assert got["metadata"] == {"reported": {"temp": stamp(T0)}}


def test_errors_for_missing_shadows_and_internal_failures() -> None:
    error = ShadowError.not_found("my-thing")
    assert (error.code, error.message) == (404, "No shadow exists with name: 'my-thing'")
    assert error.rejected("x", T2) == {
        "code": 404,
        "message": "No shadow exists with name: 'my-thing'",
        "timestamp": T2,
        "clientToken": "x",
    }
    assert ShadowError.not_found("t", client_token="c").client_token == "c"
    error = ShadowError.internal()
    assert (error.code, error.message) == (500, "Internal service failure")
    assert str(error) == "500 Internal service failure"


# ------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "Thing-1", "a:b_c-d", "x" * 128, "0"])
def test_valid_thing_names(name: str) -> None:
    validate_thing_name(name)


@pytest.mark.parametrize(
    "name", ["", "x" * 129, "a/b", "a+b", "a#", "$aws", "a b", "é", "a\n", "a.b"]
)
def test_invalid_thing_names(name: str) -> None:
    with pytest.raises(ShadowError) as caught:
        validate_thing_name(name)
    assert caught.value.code == 400
    assert "thing name" in caught.value.message


@pytest.mark.parametrize("name", ["s", "shadow_1", "a:b-c", "x" * 64])
def test_valid_shadow_names(name: str) -> None:
    validate_shadow_name(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "$shadow", "a/b", "a+b", "a#", "é", "a\n"])
def test_invalid_shadow_names(name: str) -> None:
    with pytest.raises(ShadowError) as caught:
        validate_shadow_name(name)
    assert caught.value.code == 400
    assert "shadow name" in caught.value.message


# --------------------------------------------------------------------------- storage form


def test_shadow_document_json_round_trip() -> None:
    doc = update(
        make({"desired": {"é": "ünïcode", "n": {"f": 1.5, "l": [1, "a", True]}}}),
        {"state": {"reported": {"big": 2**70, "neg": -1, "b": False}}},
    ).document
    text = doc.to_json()
    assert " " not in text.replace("ünïcode", "")  # compact
    assert "ünïcode" in text  # stored as UTF-8, not \u escapes
    again = ShadowDocument.from_json(text)
    assert again == doc
    assert ShadowDocument.from_json(text.encode()) == doc
    assert type(again.state["desired"]["n"]["f"]) is float
    assert type(again.state["reported"]["b"]) is bool
    assert ShadowDocument.from_json(ShadowDocument(version=4).to_json()) == ShadowDocument(
        version=4
    )


def test_limits_defaults() -> None:
    limits = ShadowLimits()
    assert (
        limits.max_state_bytes,
        limits.max_depth,
        limits.max_client_token_bytes,
        limits.max_payload_bytes,
    ) == (8192, 6, 64, 131072)
    assert limits == DEFAULT_LIMITS
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.max_depth = 8  # type: ignore[misc]
