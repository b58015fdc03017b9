"""Device Shadow service logic, sans-IO: bytes in, documents and reply payloads out.

No MQTT, sockets, asyncio or storage here: the shadow service loads a `ShadowDocument`
(or a tombstone version), calls `apply_update` / `get_document` / `delete_result`, stores
``result.document`` and publishes the payloads. Wire rules follow
``shared/reference/aws-iot-mqtt-api.md`` section 2. Choices where the sources disagree:

* Depth (5.2): the ``desired``/``reported`` object itself is level 1; every nested object
  **or array** adds a level; scalar leaves do not count. ``ShadowLimits.max_depth`` (default 6)
  is the deepest level allowed, and the error message names it.
* Delta (5.3): ``/update/delta`` is produced after every accepted update whose resulting delta
  is non-empty (also reported-only updates and updates that leave the delta unchanged); it
  carries the full delta.
* ``/get/accepted`` (5.4) has ``state.delta`` when non-empty but no ``metadata.delta``.
* Empty objects (5.5): the stored state never holds an empty object. A nested object emptied by
  null-deletes is pruned (recursively, up to dropping the section). An object value in a request
  is merged, then pruned: ``"a": {}`` leaves an existing object ``a`` unchanged, removes a
  scalar/array ``a`` (replaced by an empty object, which is pruned) and creates nothing when
  ``a`` is absent; ``"desired": {}`` is a no-op.
* Numbers in the delta (5.6): ``1 == 1.0``; booleans are not numbers (``True != 1``), also
  inside arrays and objects compared whole.
* ``version`` on a shadow that does not exist (5.7): absent or ``0`` ("I expect no shadow") is
  accepted; any other valid version is ``409 Version conflict``. The new shadow's version
  continues from the deleted one: pass ``deleted_version=`` (the version reported by
  ``/delete/accepted``, or 0 once the tombstone expired) and the first update yields
  ``deleted_version + 1``.
* Arrays are values: replaced whole, compared whole, one ``{"timestamp": T}`` metadata leaf per
  array (as in the AWS documentation's example, not Greengrass's per-element list). An array
  holding ``null`` anywhere inside it (also in objects within it) is rejected: 400 Invalid JSON.
* ``/update/accepted`` echoes the request's ``desired``/``reported`` exactly as sent (nulls
  included, a client-sent ``state.delta`` stripped); its metadata mirrors that echo with
  ``{"timestamp": now}`` on every leaf, null leaves included. For ``"state": null`` the echo is
  ``"state": null`` with ``"metadata": {}``.
* ``"state": {}`` (or only a client ``delta``) is an accepted no-op update: version + 1.
* ``null`` for ``clientToken`` or ``version`` means absent; other top-level request keys are
  ignored; keys inside ``state`` other than desired/reported/delta are rejected.
* NaN/Infinity, out-of-range floats and lone UTF-16 surrogates are rejected as Invalid JSON.

Structures returned here share sub-objects with their inputs and with each other (copy-on-write
merge: untouched subtrees of the previous document are reused, not copied). Treat documents and
payloads as immutable.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from agent import shadow_rules as rules
from agent import wire

JSONObject = dict[str, Any]

DESIRED = "desired"
REPORTED = "reported"
SECTIONS = (DESIRED, REPORTED)

INVALID_JSON = "Invalid JSON"
MISSING_STATE = "Missing required node: state"
STATE_NOT_OBJECT = "State node must be an object"
DESIRED_NOT_OBJECT = "Desired node must be an object"
REPORTED_NOT_OBJECT = "Reported node must be an object"
INVALID_VERSION = "Invalid version"
INVALID_CLIENT_TOKEN = "Invalid clientToken"
TOO_DEEP = "JSON contains too many levels of nesting; maximum is {max_depth}"
INVALID_STATE_NODE = "State contains an invalid node"
ARRAY_WITH_NULL = INVALID_JSON
NOT_FOUND = "No shadow exists with name: '{name}'"
VERSION_CONFLICT = "Version conflict"
TOO_LARGE = "The payload exceeds the maximum size allowed"
NOT_UTF8 = "Unsupported documented encoding; supported encoding is UTF-8"
INTERNAL_FAILURE = "Internal service failure"

_SECTION_NOT_OBJECT = {DESIRED: DESIRED_NOT_OBJECT, REPORTED: REPORTED_NOT_OBJECT}
_STATE_KEYS = frozenset((DESIRED, REPORTED, "delta"))

_TOKEN_IN_TEXT = re.compile(r'"clientToken"\s*:\s*("(?:[^"\\]|\\.)*")')


@dataclass(frozen=True)
class ShadowLimits:
    """Per-service limits; defaults are the AWS IoT values (depth: see module docstring)."""

    max_state_bytes: int = 8192
    max_depth: int = 6
    max_client_token_bytes: int = 64
    max_payload_bytes: int = 131072


DEFAULT_LIMITS = ShadowLimits()


class ShadowError(Exception):
    """A request the shadow service rejects; ``rejected()`` is the ``*/rejected`` payload.

    `apply_update` and `parse_request` set ``client_token`` on what they raise: the request's
    validated token, or a best-effort `client_token_of` when the request could not be read, so
    the service replies with ``error.rejected(error.client_token, now)``.
    """

    def __init__(self, code: int, message: str, client_token: str | None = None) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.client_token = client_token

    @classmethod
    def internal(cls, client_token: str | None = None) -> ShadowError:
        """500, for a storage failure around an otherwise valid request."""
        return cls(500, INTERNAL_FAILURE, client_token)

    @classmethod
    def not_found(cls, name: str, client_token: str | None = None) -> ShadowError:
        """404 for get/delete of a missing shadow; ``name`` is what the message quotes."""
        return cls(404, NOT_FOUND.format(name=name), client_token)

    def rejected(self, client_token: str | None, now: int) -> JSONObject:
        payload: JSONObject = {"code": self.code, "message": self.message, "timestamp": now}
        if client_token is not None:
            payload["clientToken"] = client_token
        return payload


@dataclass
class ShadowDocument:
    """A stored shadow: ``state`` and ``metadata`` hold only non-empty desired/reported."""

    state: JSONObject = field(default_factory=dict)
    metadata: JSONObject = field(default_factory=dict)
    version: int = 0

    def snapshot(self) -> JSONObject:
        """The ``previous``/``current`` shape of ``/update/documents``."""
        return {"state": self.state, "metadata": self.metadata, "version": self.version}

    def to_json(self) -> str:
        return _compact(self.snapshot())

    @classmethod
    def from_json(cls, data: str | bytes) -> ShadowDocument:
        raw = json.loads(data)
        return cls(
            state=raw.get("state") or {},
            metadata=raw.get("metadata") or {},
            version=int(raw.get("version", 0)),
        )


@dataclass(frozen=True)
class UpdateResult:
    """Outcome of an accepted update: the document to store and the payloads to publish."""

    document: ShadowDocument
    accepted: JSONObject
    delta: JSONObject | None
    documents: JSONObject


# ------------------------------------------------------------------------------ parsing


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


_decode = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant).decode
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _load(payload: bytes, limits: ShadowLimits) -> Any:
    if len(payload) > limits.max_payload_bytes:
        raise ShadowError(413, TOO_LARGE)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ShadowError(415, NOT_UTF8) from None
    try:
        value = _decode(text)
        if "\\u" in text:  # an escape may have produced a lone surrogate: not valid Unicode
            _compact(value).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise ShadowError(400, INVALID_JSON) from None
    return value


def _token(request: JSONObject, limits: ShadowLimits) -> str | None:
    token = request.get("clientToken")
    if token is None:
        return None
    if type(token) is not str:
        raise ShadowError(400, INVALID_CLIENT_TOKEN)
    try:
        size = len(token.encode("utf-8"))
    except UnicodeEncodeError:
        raise ShadowError(400, INVALID_CLIENT_TOKEN) from None
    if size > limits.max_client_token_bytes:
        raise ShadowError(400, INVALID_CLIENT_TOKEN)
    return token


def client_token_of(payload: bytes, limits: ShadowLimits = DEFAULT_LIMITS) -> str | None:
    """The request's valid clientToken, best effort (also from broken JSON), else None."""
    try:
        text = payload.decode("utf-8", "surrogateescape")
        try:
            request = _decode(text)
        except (ValueError, RecursionError):
            match = _TOKEN_IN_TEXT.search(text)
            if match is None:
                return None
            request = {"clientToken": json.loads(match.group(1))}
        if type(request) is not dict:
            return None
        return _token(request, limits)
    except (ShadowError, ValueError, RecursionError):
        return None


def parse_request(
    payload: bytes, limits: ShadowLimits = DEFAULT_LIMITS
) -> tuple[JSONObject, str | None]:
    """Parse a get/delete request: empty, ``{}`` or ``{"clientToken": ...}`` (other keys kept)."""
    try:
        if len(payload) <= limits.max_payload_bytes and not payload.strip():
            return {}, None
        request = _load(payload, limits)
        if type(request) is not dict:
            raise ShadowError(400, INVALID_JSON)
        return request, _token(request, limits)
    except ShadowError as error:
        error.client_token = client_token_of(payload, limits)
        raise


def validate_thing_name(name: str) -> None:
    if type(name) is not str or wire.THING_NAME_PATTERN.fullmatch(name) is None:
        raise ShadowError(
            400, f"Invalid thing name: {name!r}; 1-128 characters from a-z A-Z 0-9 : _ -"
        )


def validate_shadow_name(name: str) -> None:
    if type(name) is not str or wire.SHADOW_NAME_PATTERN.fullmatch(name) is None:
        raise ShadowError(
            400, f"Invalid shadow name: {name!r}; 1-64 characters from a-z A-Z 0-9 : _ -"
        )


# ---------------------------------------------------------------------------- validation


def _check_object(obj: JSONObject, depth: int, max_depth: int, in_array: bool) -> None:
    if depth > max_depth:
        raise ShadowError(400, TOO_DEEP.format(max_depth=max_depth))
    for value in obj.values():
        kind = type(value)
        if kind is dict:
            _check_object(value, depth + 1, max_depth, in_array)
        elif kind is list:
            _check_array(value, depth + 1, max_depth)
        elif value is None and in_array:
            raise ShadowError(400, ARRAY_WITH_NULL)


def _check_array(array: list[Any], depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise ShadowError(400, TOO_DEEP.format(max_depth=max_depth))
    for value in array:
        kind = type(value)
        if value is None:
            raise ShadowError(400, ARRAY_WITH_NULL)
        if kind is dict:
            _check_object(value, depth + 1, max_depth, True)
        elif kind is list:
            _check_array(value, depth + 1, max_depth)


def _version(request: JSONObject) -> int | None:
    version = request.get("version")
    if version is None:
        return None
    if type(version) is not int or version < 0:
        raise ShadowError(400, INVALID_VERSION)
    return version


# --------------------------------------------------------------------------------- merge


def _stamp_like(patch: JSONObject, stamp: JSONObject) -> JSONObject:
    return {
        key: _stamp_like(value, stamp) if type(value) is dict else stamp
        for key, value in patch.items()
    }


def _state_bytes(state: JSONObject) -> int:
    return sum(len(_compact(section).encode("utf-8")) for section in state.values())


# --------------------------------------------------------------------------------- delta


def compute_delta(desired: JSONObject, reported: JSONObject) -> JSONObject:
    """Desired keys out of sync with reported (see agent.shadow_rules.delta), ``{}`` if none."""
    return rules.delta(desired, reported) or {}


def _document_delta(doc: ShadowDocument) -> JSONObject | None:
    desired: JSONObject | None = doc.state.get(DESIRED)
    if not desired:
        return None
    reported = doc.state.get(REPORTED)
    if not reported:
        return desired
    return rules.delta(desired, reported)


# ------------------------------------------------------------------------------ requests


def apply_update(
    current: ShadowDocument | None,
    payload: bytes,
    *,
    now: int,
    limits: ShadowLimits = DEFAULT_LIMITS,
    deleted_version: int = 0,
) -> UpdateResult:
    """Apply an ``/update`` request to ``current`` (None: no shadow) without mutating it.

    ``deleted_version`` is the version of the deleted shadow (its tombstone) when
    ``current`` is None (ignored otherwise); the created shadow gets ``deleted_version + 1``.
    Raises `ShadowError` with ``client_token`` set to the validated token, or to a best-effort
    `client_token_of` when the request could not be read that far.
    """
    token: str | None = None
    try:
        request = _load(payload, limits)
        if type(request) is not dict:
            raise ShadowError(400, INVALID_JSON)
        token = _token(request, limits)
        return _update(current, request, token, int(now), limits, deleted_version)
    except ShadowError as error:
        error.client_token = token if token is not None else client_token_of(payload, limits)
        raise


def _update(
    current: ShadowDocument | None,
    request: JSONObject,
    token: str | None,
    now: int,
    limits: ShadowLimits,
    deleted_version: int,
) -> UpdateResult:
    version = _version(request)
    if "state" not in request:
        raise ShadowError(400, MISSING_STATE)
    state = request["state"]
    echo: JSONObject | None
    if state is None:
        echo = None
    elif type(state) is not dict:
        raise ShadowError(400, STATE_NOT_OBJECT)
    else:
        echo = {}
        for key, value in state.items():
            if key not in _STATE_KEYS:
                raise ShadowError(400, INVALID_STATE_NODE)
            if key == "delta":
                continue
            if value is not None:
                if type(value) is not dict:
                    raise ShadowError(400, _SECTION_NOT_OBJECT[key])
                _check_object(value, 1, limits.max_depth, False)
            echo[key] = value

    if current is None:
        if version not in (None, 0):
            raise ShadowError(409, VERSION_CONFLICT)
        base_state: JSONObject = {}
        base_meta: JSONObject = {}
        new_version = deleted_version + 1
    else:
        if version is not None and version != current.version:
            raise ShadowError(409, VERSION_CONFLICT)
        base_state = current.state
        base_meta = current.metadata
        new_version = current.version + 1

    stamp = {"timestamp": now}
    if echo is None:
        new_state: JSONObject = {}
        new_meta: JSONObject = {}
        accepted_meta: JSONObject = {}
    else:
        new_state = dict(base_state)
        new_meta = dict(base_meta)
        accepted_meta = {}
        for section, patch in echo.items():
            if patch is None:
                new_state.pop(section, None)
                new_meta.pop(section, None)
                accepted_meta[section] = stamp
                continue
            merged, merged_meta = rules.merge_with_metadata(
                base_state.get(section), base_meta.get(section), patch, stamp
            )
            if merged:
                new_state[section] = merged
                new_meta[section] = merged_meta
            else:
                new_state.pop(section, None)
                new_meta.pop(section, None)
            accepted_meta[section] = _stamp_like(patch, stamp)
        if _state_bytes(new_state) > limits.max_state_bytes:
            raise ShadowError(413, TOO_LARGE)

    document = ShadowDocument(state=new_state, metadata=new_meta, version=new_version)
    accepted: JSONObject = {
        "state": echo,
        "metadata": accepted_meta,
        "version": new_version,
        "timestamp": now,
    }
    documents: JSONObject = {"current": document.snapshot(), "timestamp": now}
    if current is not None:
        documents["previous"] = current.snapshot()
    delta_state = _document_delta(document)
    delta: JSONObject | None = None
    if delta_state:
        delta = {
            "state": delta_state,
            "metadata": rules.mirror_metadata(
                delta_state, new_state[DESIRED], new_meta.get(DESIRED) or {}
            ),
            "version": new_version,
            "timestamp": now,
        }
    if token is not None:
        accepted["clientToken"] = token
        documents["clientToken"] = token
        if delta is not None:
            delta["clientToken"] = token
    return UpdateResult(document=document, accepted=accepted, delta=delta, documents=documents)


def get_document(doc: ShadowDocument, *, now: int, client_token: str | None) -> JSONObject:
    """The ``/get/accepted`` payload: state (with ``delta`` when non-empty) and metadata."""
    state = dict(doc.state)
    delta = _document_delta(doc)
    if delta:
        state["delta"] = delta
    payload: JSONObject = {
        "state": state,
        "metadata": doc.metadata,
        "version": doc.version,
        "timestamp": int(now),
    }
    if client_token is not None:
        payload["clientToken"] = client_token
    return payload


def delete_result(doc: ShadowDocument, *, now: int, client_token: str | None) -> JSONObject:
    """The ``/delete/accepted`` payload; ``doc.version`` is also the tombstone version to keep."""
    payload: JSONObject = {"version": doc.version, "timestamp": int(now)}
    if client_token is not None:
        payload["clientToken"] = client_token
    return payload
