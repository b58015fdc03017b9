"""The device's half of the Device Shadow rules: pure logic, no I/O.

- `merge`, `equal`, `delta` (from agent/shadow_rules.py, the one home of the document rules the
  service uses too): the update merge, applied locally to keep the device's view of ``reported``.
- `compose`: one update equivalent to two in a row (None when MQTT cannot express it in one),
  which is what lets reports made while offline go out as a single update on reconnect.
- `ReportQueue`: the outgoing reports, composed as far as the merge rules allow, optionally
  bounded in bytes (`ReportQueueFull`).
- `ShadowTracker`: the versions seen (stale messages dropped, as the API asks clients to do),
  the desired keys already handed to the handlers, and the requests and reports to send.

Values compare the way the service compares them, with its own `equal`.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from agent.shadow_rules import delta, equal, merge

Document = dict[str, Any]

#: AWS's limit on clientToken: 64 bytes.
CLIENT_TOKEN_BYTES: Final = 64


class ShadowProtocolError(ValueError):
    """A reply from the service that is not a Device Shadow document."""


class ReportQueueFull(Exception):
    """A report refused because the queue would then encode to more than its byte limit.
    The queue is unchanged: nothing accepted before is lost."""

    def __init__(self, size: int, limit: int, shadow: str | None = None) -> None:
        self.size, self.limit, self.shadow = size, limit, shadow
        where = f" for shadow {shadow}" if shadow else ""
        super().__init__(
            f"report queue{where} would hold {size} bytes, over the limit of {limit}; "
            "the broker is unreachable or the reports are too large — "
            "the queued reports are kept, this one is not"
        )


# ----------------------------------------------------------------------------- values


def _without_nulls(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def compose(first: Mapping[str, Any], second: Mapping[str, Any]) -> Document | None:
    """One patch with the effect of ``first`` then ``second`` on any document, or None.

    Not expressible: ``second`` merges an object into a key that ``first`` deleted or set to a
    non-object. The pair means "replace the object", one update can only say "merge into it".
    """
    result: Document = dict(first)
    for key, value in second.items():
        if key not in first or not isinstance(value, dict):
            result[key] = value
            continue
        earlier = first[key]
        if not isinstance(earlier, dict):
            return None
        inner = compose(earlier, value)
        if inner is None:
            return None
        result[key] = inner
    return result


def changes(patch: Mapping[str, Any], known: Mapping[str, Any]) -> Document:
    """The part of ``patch`` that would change ``known`` (reporting the rest is a no-op)."""
    result: Document = {}
    for key, value in patch.items():
        if value is None:
            if key in known:
                result[key] = None
        elif isinstance(value, dict) and isinstance(known.get(key), dict):
            inner = changes(value, known[key])
            if inner:
                result[key] = inner
        elif isinstance(value, dict):
            if key in known or _without_nulls(value):
                result[key] = value
        elif key not in known or not equal(value, known[key]):
            result[key] = value
    return result


def new_client_token(prefix: str = "fa") -> str:
    """Random and well under the 64-byte limit."""
    return f"{prefix}-{secrets.token_hex(12)}"


# ------------------------------------------------------------------------ report queue


def _encode(patches: list[Document]) -> bytes:
    return json.dumps({"format": 1, "patches": patches}, separators=(",", ":")).encode()


@dataclass
class ReportQueue:
    """Reports not yet accepted by the service, oldest first, composed where possible.

    Normally this is a single patch however many reports were made offline; a second one starts
    only where `compose` cannot merge (a key deleted, then given an object).
    """

    patches: list[Document] = field(default_factory=list)
    #: The first patch is on the wire: nothing may be composed into it any more.
    head_sealed: bool = False

    def __bool__(self) -> bool:
        return bool(self.patches)

    def add(self, patch: Mapping[str, Any], max_bytes: int | None = None) -> None:
        """Queue ``patch``. With ``max_bytes``: raise ReportQueueFull, leaving the queue as it
        was, if it would then encode to more than that (a queue already over the limit, say
        loaded from disk, keeps everything and takes only reports that bring it under)."""
        if not patch:
            return
        patches = self._with(copy.deepcopy(dict(patch)))
        if max_bytes is not None:
            size = len(_encode(patches))
            if size > max_bytes:
                raise ReportQueueFull(size, max_bytes)
        self.patches[:] = patches

    def _with(self, patch: Document) -> list[Document]:
        """The patches after adding ``patch``; ``self`` is not modified (compose copies)."""
        if self.patches and not (self.head_sealed and len(self.patches) == 1):
            composed = compose(self.patches[-1], patch)
            if composed is not None:
                return [*self.patches[:-1], composed]
        return [*self.patches, patch]

    def head(self) -> Document | None:
        return self.patches[0] if self.patches else None

    def pop_head(self) -> None:
        if self.patches:
            self.patches.pop(0)
        self.head_sealed = False

    def encode(self) -> bytes:
        return _encode(self.patches)

    def size(self) -> int:
        """Bytes on disk: what the limit of `add` counts."""
        return len(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> ReportQueue:
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        patches = document.get("patches") if isinstance(document, dict) else None
        if not isinstance(patches, list) or not all(isinstance(p, dict) for p in patches):
            raise ValueError("no list of report patches")
        return cls(patches)


# ----------------------------------------------------------------------- the tracker


def update_request(
    reported: Mapping[str, Any], client_token: str, version: int | None = None
) -> Document:
    """An ``/update`` request that reports ``reported``; with ``version``, optimistic locking."""
    request: Document = {"state": {"reported": dict(reported)}, "clientToken": client_token}
    if version is not None:
        request["version"] = version
    return request


def _object(document: object, what: str) -> Document:
    if not isinstance(document, dict):
        raise ShadowProtocolError(f"{what} is not a JSON object")
    return document


def _version(document: Mapping[str, Any], what: str) -> int:
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ShadowProtocolError(f"{what} has no valid version")
    return version


def _section(state: Mapping[str, Any], name: str) -> Document:
    section = state.get(name)
    return section if isinstance(section, dict) else {}


@dataclass
class Rejection:
    """A ``/rejected`` reply: AWS's error document."""

    code: int
    message: str
    client_token: str | None

    @classmethod
    def parse(cls, document: object) -> Rejection:
        doc = _object(document, "rejected reply")
        code = doc.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            raise ShadowProtocolError("rejected reply has no numeric code")
        token = doc.get("clientToken")
        return cls(code, str(doc.get("message", "")), token if isinstance(token, str) else None)

    @property
    def retryable(self) -> bool:
        """Worth sending again later: conflicts, throttling and service failures."""
        return self.code in (409, 429) or self.code >= 500


# ------------------------------------------------------------- what to do with a reply


class NextStep(Enum):
    SENT = "sent"  # accepted: the report leaves the queue
    RESYNC = "resync"  # 409: get the document (its version), then send again
    RETRY = "retry"  # throttled, a service failure or no reply: send again after the delay
    PARK = "park"  # refused for good: keep it aside (the rejected file), go on with the next


@dataclass(frozen=True)
class ReportDecision:
    step: NextStep
    delay: float = 0.0
    #: The conflicts and the other retryable failures in a row, for the next decision.
    conflicts: int = 0
    failures: int = 0


def after_report(
    outcome: Document | Rejection,
    *,
    conflicts: int,
    failures: int,
    backoff: Callable[[int], float],
) -> ReportDecision:
    """What the device does with the answer to one report (an update of ``reported``), given
    the conflicts and failures in a row before it; ``backoff(n)`` is the wait after the n-th.

    One conflict is someone else's update, resolved at once by a get; more in a row mean the
    device's view does not converge (a busy writer, a service that lost data): back off
    rather than spin. A report no retry can help is parked, never dropped."""
    if not isinstance(outcome, Rejection):
        return ReportDecision(NextStep.SENT)
    if outcome.code == 409:
        delay = backoff(conflicts) if conflicts else 0.0
        return ReportDecision(NextStep.RESYNC, delay, conflicts + 1, failures)
    if outcome.retryable:
        return ReportDecision(NextStep.RETRY, backoff(failures + 1), conflicts, failures + 1)
    return ReportDecision(NextStep.PARK, 0.0, conflicts, failures)


@dataclass
class ShadowTracker:
    """What the device knows about one shadow, driven by the messages it receives.

    ``version`` is the newest version seen in any message; anything older is stale, except
    the reply to the device's own get (``current``, if nothing newer came in meanwhile): that
    is the service's document as it is now, even at a lower version (the service's versions
    went back: a registry restored from a backup, commits lost to a power cut), and holding on
    to the higher one would drop every message from then on.
    ``attempted`` holds the desired values already handed to the handlers, so a delta that is
    re-sent (after every update that leaves desired unreached) does not re-run them.
    """

    version: int | None = None
    exists: bool | None = None
    desired: Document = field(default_factory=dict)
    reported: Document = field(default_factory=dict)
    delta: Document = field(default_factory=dict)
    attempted: Document = field(default_factory=dict)

    def _is_stale(self, version: int) -> bool:
        return self.version is not None and version < self.version

    def on_get_accepted(self, document: object, *, current: bool = False) -> Document:
        """A full document: replace what we know; return its delta. ``current``: the reply to
        our own get, with nothing newer seen while it was on its way: never stale."""
        doc = _object(document, "get/accepted")
        version = _version(doc, "get/accepted")
        if self._is_stale(version) and not current:
            return {}
        state = _section(doc, "state")
        self.version, self.exists = version, True
        self.desired = _section(state, "desired")
        self.reported = _section(state, "reported")
        self.delta = _section(state, "delta")
        self._forget_settled()
        return self.delta

    def on_get_missing(self) -> None:
        """get/rejected 404: there is no shadow (yet); the first report creates it (at a
        version we cannot know: it may restart at 1)."""
        self.version = None
        self.exists, self.desired, self.reported, self.delta = False, {}, {}, {}

    def on_update_accepted(self, document: object) -> None:
        doc = _object(document, "update/accepted")
        version = _version(doc, "update/accepted")
        if self._is_stale(version):
            return
        self.version, self.exists = version, True
        if "state" in doc and doc["state"] is None:  # "state": null cleared both sections
            self.desired, self.reported = {}, {}
        state = _section(doc, "state")
        if "desired" in state:
            section = state["desired"]
            self.desired = (
                {} if section is None else merge(self.desired, _object(section, "desired"))
            )
        if "reported" in state:
            section = state["reported"]
            self.reported = (
                {} if section is None else merge(self.reported, _object(section, "reported"))
            )
        # No delta message follows an update that brings the two in sync: work it out here.
        self.delta = delta(self.desired, self.reported) or {}
        self._forget_settled()

    def on_delta(self, document: object) -> Document | None:
        """An ``/update/delta``: the out-of-sync desired keys, or None if it is stale."""
        doc = _object(document, "update/delta")
        version = _version(doc, "update/delta")
        if self._is_stale(version):
            return None
        self.version, self.exists = version, True
        self.delta = _section(doc, "state")
        self._forget_settled()
        return self.delta

    def on_deleted(self, document: object) -> None:
        doc = _object(document, "delete/accepted")
        if self._is_stale(_version(doc, "delete/accepted")):
            return  # a delete from before what we know (the shadow was re-created since)
        # A shadow re-created more than 48 h later starts again at version 1: forget ours.
        self.version = None
        self.exists, self.desired, self.reported, self.delta = False, {}, {}, {}
        self.attempted.clear()

    def _forget_settled(self) -> None:
        """Keys in sync again are no longer "attempted": if they drift out of sync later,
        with the same desired value, that is new work for the handlers."""
        for key in [k for k in self.attempted if k not in self.delta]:
            del self.attempted[key]

    def to_apply(self, delta: Mapping[str, Any]) -> Document:
        """The top-level keys of ``delta`` not yet handed to the handlers with these values;
        they are recorded as attempted (a handler that is interrupted before it returns must
        `forget_attempts` its keys, or they are never handed over again)."""
        fresh = {
            key: value
            for key, value in delta.items()
            if key not in self.attempted or not equal(self.attempted[key], value)
        }
        self.attempted.update(fresh)
        return fresh

    def forget_attempts(self, keys: Any) -> None:
        """Handlers failed on ``keys``: try them again on the next delta, get or tick."""
        for key in keys:
            self.attempted.pop(key, None)

    def report_changes(self, patch: Mapping[str, Any], queued: ReportQueue) -> Document:
        """The part of ``patch`` that changes the reported state the service will have once
        ``queued`` is sent; empty when reporting it would change nothing."""
        expected = self.reported
        for earlier in queued.patches:
            expected = merge(expected, earlier)
        return changes(patch, expected)

    def lock_version(self) -> int | None:
        """The version to send for optimistic locking: the newest one seen, if the shadow
        exists (a new shadow is created by an update without a version)."""
        return self.version if self.exists else None
