"""The Device Shadow document rules, once, for both sides: pure functions on JSON values.

The shadow service (broker/shadow.py) and the agent's local model (agent/shadow.py) both use
these; a differential test (tests/test_shadow_rules_agree.py) drives the two whole paths with
random documents. The rules follow ``shared/reference/aws-iot-mqtt-api.md`` section 2:

- **equal**: JSON equality; ``1 == 1.0``, but a boolean is never a number, also inside arrays
  and objects compared whole.
- **merge**: an update's section into a stored one. Objects merge recursively, ``null``
  deletes a key, an object left empty is removed (the stored state never holds ``{}``), and
  anything else, arrays included, replaces. Copy-on-write: untouched subtrees are shared with
  the input, never copied, so treat every document as immutable.
- **delta**: every desired key whose reported value differs (objects key by key, arrays
  whole); keys only in reported never appear, a desired ``null`` is a deletion, not a wish.
- **metadata**: each leaf's ``{"timestamp": T}``, merged alongside its value, and mirrored in
  the delta's shape.

Only ``type(x) is dict`` counts as an object: these are documents from ``json.loads``, and
the exact type test keeps the service's hot path fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JSONObject = dict[str, Any]

_NUMBERS = (int, float)


def equal(a: Any, b: Any) -> bool:
    """JSON equality as the delta sees it."""
    kind = type(a)
    if kind is not type(b):
        return kind in _NUMBERS and type(b) in _NUMBERS and a == b
    if kind is dict:
        return len(a) == len(b) and all(
            key in b and equal(value, b[key]) for key, value in a.items()
        )
    if kind is list:
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def merge(base: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> JSONObject:
    """``base`` after an update of ``patch`` (no metadata kept)."""
    return merge_with_metadata(base, None, patch, None)[0]


def merge_with_metadata(
    base: Mapping[str, Any] | None,
    base_meta: Mapping[str, Any] | None,
    patch: Mapping[str, Any],
    stamp: Any,
) -> tuple[JSONObject, JSONObject]:
    """``patch`` merged into ``base``, and ``stamp`` (a leaf's ``{"timestamp": T}``) into
    ``base_meta`` at every leaf the patch sets."""
    out = dict(base) if base else {}
    meta = dict(base_meta) if base_meta else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
            meta.pop(key, None)
        elif type(value) is dict:
            current = out.get(key)
            if type(current) is dict:
                current_meta = meta.get(key)
                sub, sub_meta = merge_with_metadata(
                    current, current_meta if type(current_meta) is dict else None, value, stamp
                )
            else:
                sub, sub_meta = merge_with_metadata(None, None, value, stamp)
            if sub:
                out[key] = sub
                meta[key] = sub_meta
            else:
                out.pop(key, None)
                meta.pop(key, None)
        else:
            out[key] = value
            meta[key] = stamp
    return out, meta


def delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> JSONObject | None:
    """The desired keys out of sync with ``reported``, or None when in sync (no allocation
    on the service's common path)."""
    out: JSONObject | None = None
    for key, want in desired.items():
        if want is None:
            continue
        have: Any = reported.get(key)  # typed Any: the type test below narrows it
        kind = type(want)
        if kind is type(have):  # the hot path, with plain == where it is exact
            if kind is dict:
                sub = delta(want, have)
                if sub is not None:
                    if out is None:
                        out = {}
                    out[key] = sub
                continue
            if want == have if kind is not list else equal(want, have):
                continue
        elif have is not None and kind in _NUMBERS and type(have) in _NUMBERS and want == have:
            continue
        # the whole desired value: desired-only key, changed scalar or array, other type
        if out is None:
            out = {}
        out[key] = want
    return out


def mirror_metadata(in_delta: JSONObject, desired: JSONObject, meta: JSONObject) -> JSONObject:
    """The metadata of a delta: the desired timestamps, in the delta's shape (``meta``
    itself when the delta is all of ``desired``)."""
    if in_delta is desired:
        return meta
    out: JSONObject = {}
    for key, value in in_delta.items():
        sub_meta = meta.get(key)
        if sub_meta is None:
            continue
        if type(value) is dict and type(sub_meta) is dict:
            out[key] = mirror_metadata(value, desired[key], sub_meta)
        else:
            out[key] = sub_meta
    return out
