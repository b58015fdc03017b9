"""What a simulator run measured: step timings, errors and sampled levels, across processes.

Each worker process records into its own `Recorder` and every so often sends `drain()` (a small
JSON-able dict of what happened since the last drain) to the parent, which `merge()`s those into
one `Recorder` and reads `summary()` for the report table and `timeline()` for progress and plots.
Pure: no I/O; the clock is only read as a default (`time.time()`) when no time is given.

Conventions:
- Times are kept as seconds since the run's start (`started`) and durations in seconds, both
  rounded to microseconds when recorded: a drained value then merges back bit for bit (merging
  drains equals recording everything in one place), and snapshots stay short.
- Samples live in `array('d')`, 16 bytes per step completion, not in Python objects: 500,000
  completions cost about 8 MB.
- Percentiles are nearest-rank: the p-th percentile is the smallest sample such that at least p %
  of the samples are <= it. It is always a value that was really observed, and "p99 < 100 ms"
  means what it says: 99 % of the samples took at most that long.
- A gauge keeps the last value per 1-second bucket of each name. A level measured in several
  processes (devices connected per worker) must not overwrite itself across workers: name each
  source `<name>@<source>` (e.g. `devices_connected@3`); `timeline()` and `summary()` report
  `<name>` as the sum over its sources, each carrying its last value forward. A source that stops
  should report its final level (e.g. 0) before it goes.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Collection, Iterable, Sequence
from typing import Any

#: Steps in the order a device lives them, for tables; steps not named here follow.
STEP_ORDER = (
    "ceiling_connect",
    "tcp_connect",
    "tls_handshake",
    "connack",
    "suback",
    "create_certificate",
    "register_thing",
    "onboarding",
    "shadow_update",
    "delta_delivery",
    "desired_to_reported",
    "reconnect",
)


#: Human names of the steps, for tables and report.json's "label" (the keys stay snake_case
#: for scripts); the same words as the README and the demo's tables.
STEP_LABELS = {
    "ceiling_connect": "bare mutual-TLS connect (ceiling)",
    "tcp_connect": "TCP connect",
    "tls_handshake": "mutual-TLS handshake",
    "connack": "CONNECT -> CONNACK",
    "suback": "SUBSCRIBE -> SUBACK",
    "create_certificate": "CreateCertificateFromCsr",
    "register_thing": "RegisterThing",
    "onboarding": "whole onboarding",
    "shadow_update": "shadow update round trip",
    "delta_delivery": "desired -> device (delta)",
    "desired_to_reported": "desired -> reported",
    "reconnect": "reconnect",
    # Steps that only fail (errors tables): a connect as a whole, the first shadow get.
    "connect": "connect",
    "shadow_sync": "shadow sync",
}


def step_label(step: str) -> str:
    return STEP_LABELS.get(step, step.replace("_", " "))


def in_step_order(steps: Iterable[str]) -> list[str]:
    present = list(steps)
    return [s for s in STEP_ORDER if s in present] + [s for s in present if s not in STEP_ORDER]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank p-th percentile (0 < p <= 100) of values sorted in ascending order."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p!r}")
    # Rounding strips float noise (0.29 * 100 = 28.999999999999996) before ceil picks the rank.
    rank = math.ceil(round(p * len(sorted_values) / 100, 9))
    return sorted_values[max(rank, 1) - 1]


def format_ms(ms: float | None) -> str:
    """A duration in milliseconds for a table: '0.84 ms', '12.3 ms', '1.24 s'; '-' for no value."""
    if ms is None:
        return "-"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Recorder:
    """Timings, errors and gauges of one process, or of a whole run once drains are merged."""

    def __init__(self, started: float) -> None:
        self.started = started
        # step -> (completion offsets, durations), both in seconds and index-aligned
        self._steps: dict[str, tuple[array[float], array[float]]] = {}
        # step -> kind -> offsets of the failures
        self._errors: dict[str, dict[str, array[float]]] = {}
        # step -> kind -> the first message of that kind (what a reader needs to act on it)
        self._error_messages: dict[str, dict[str, str]] = {}
        # gauge name -> whole second since start -> (offset, value) of the last sample in it
        self._gauges: dict[str, dict[int, tuple[float, float]]] = {}

    # -- recording ---------------------------------------------------------------------------

    def observe(self, step: str, seconds: float, at: float | None = None) -> None:
        """One completed `step` that took `seconds` and finished at wall time `at` (default now)."""
        if not seconds >= 0:  # also refuses NaN, which would poison every percentile
            raise ValueError(f"step {step!r}: duration must be a number >= 0, got {seconds!r}")
        offsets, durations = self._samples(step)
        offsets.append(self._offset(at))
        durations.append(round(seconds, 6))

    def error(
        self, step: str, kind: str, at: float | None = None, message: str | None = None
    ) -> None:
        """A failure of `step`, of a short `kind` ('timeout', 'ResourceConflictsException');
        `message`, the error's own words, is kept for the first failure of each kind."""
        self._errors.setdefault(step, {}).setdefault(kind, array("d")).append(self._offset(at))
        if message:
            self._error_messages.setdefault(step, {}).setdefault(kind, message[:300])

    def gauge(self, name: str, value: float, at: float | None = None) -> None:
        """A sampled level (devices connected, a broker $SYS figure, a queue depth)."""
        self._set_gauge(name, self._offset(at), float(value))

    # -- moving between processes ------------------------------------------------------------

    def drain(self) -> dict[str, Any]:
        """Everything recorded since the last drain, as a JSON-able dict; forgets it here.

        Shape: {"started": float,
                "steps": {step: {"at": [offset_s, ...], "seconds": [duration_s, ...]}},
                "errors": {step: {kind: [offset_s, ...]}},
                "error_messages": {step: {kind: first message}},
                "gauges": {name: {"at": [offset_s, ...], "value": [float, ...]}}}
        A kind's message may come again in a later drain; `merge` keeps the first.
        """
        snapshot = {
            "started": self.started,
            "steps": {
                step: {"at": offsets.tolist(), "seconds": durations.tolist()}
                for step, (offsets, durations) in self._steps.items()
            },
            "errors": {
                step: {kind: offsets.tolist() for kind, offsets in kinds.items()}
                for step, kinds in self._errors.items()
            },
            "error_messages": {step: dict(kinds) for step, kinds in self._error_messages.items()},
            "gauges": {
                name: {
                    "at": [offset for offset, _ in samples.values()],
                    "value": [value for _, value in samples.values()],
                }
                for name, samples in self._gauges.items()
            },
        }
        self._steps, self._errors, self._gauges = {}, {}, {}
        self._error_messages = {}
        return snapshot

    def merge(self, snapshot: dict[str, Any]) -> None:
        """Add a `drain()` of another recorder (whose `started` may differ) into this one."""
        shift = snapshot["started"] - self.started

        def rebased(offsets: list[float]) -> Iterable[float]:
            # Same start (the usual case): no arithmetic, so values stay bit-identical.
            return offsets if not shift else (round(o + shift, 6) for o in offsets)

        for step, samples in snapshot["steps"].items():
            if len(samples["at"]) != len(samples["seconds"]):
                raise ValueError(f"snapshot step {step!r}: 'at' and 'seconds' differ in length")
            offsets, durations = self._samples(step)
            offsets.extend(rebased(samples["at"]))
            durations.extend(samples["seconds"])
        for step, kinds in snapshot["errors"].items():
            for kind, offsets in kinds.items():
                self._errors.setdefault(step, {}).setdefault(kind, array("d")).extend(
                    rebased(offsets)
                )
        for step, kinds in snapshot.get("error_messages", {}).items():
            for kind, message in kinds.items():
                self._error_messages.setdefault(step, {}).setdefault(kind, message)
        for name, samples in snapshot["gauges"].items():
            for offset, value in zip(rebased(samples["at"]), samples["value"], strict=True):
                self._set_gauge(name, offset, value)

    # -- reading -----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Totals for the report, JSON-able.

        Shape: {"started": float, "span_s": seconds from start to the last thing recorded,
                "steps": {step: {"count", "rate_per_s", "mean_ms", "p50_ms", "p90_ms", "p99_ms",
                                 "max_ms"}},   # steps in the order first seen
                "errors": {step: {kind: count}}, "errors_total": int,
                "error_messages": {step: {kind: first message}},
                "gauges": {name: {"last": float, "max": float}}}   # per 1-second bucket

        rate_per_s is (count - 1) / (last completion - first completion): completions evenly
        spaced at rate r give exactly r. It is 0 with fewer than 2 completions or no time between
        them. Percentiles are nearest-rank over all samples.
        """
        steps = self.step_summary()
        errors = {
            step: {kind: len(offsets) for kind, offsets in kinds.items()}
            for step, kinds in self._errors.items()
        }
        gauges: dict[str, dict[str, float]] = {}
        for name, series in self._gauge_series(1.0, self._bucket_count(1.0)).items():
            known = [value for value in series if value is not None]
            gauges[name] = {"last": known[-1], "max": max(known)}
        last = self._last_offset()
        return {
            "started": self.started,
            "span_s": round(max(last, 0.0), 6) if last is not None else 0.0,
            "steps": steps,
            "errors": errors,
            "errors_total": sum(sum(kinds.values()) for kinds in errors.values()),
            "error_messages": {step: dict(kinds) for step, kinds in self._error_messages.items()},
            "gauges": gauges,
        }

    def errors_total(self) -> int:
        return sum(len(offsets) for kinds in self._errors.values() for offsets in kinds.values())

    def step_summary(
        self,
        since: float = -math.inf,
        until: float = math.inf,
        only: Collection[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """`summary()`'s "steps", over completions at offsets in [since, until) only (a phase
        of the run: the steady hold after onboarding, say), of the steps in ``only``."""
        steps: dict[str, dict[str, Any]] = {}
        whole = since == -math.inf and until == math.inf
        for step, (all_offsets, all_durations) in self._steps.items():
            if only is not None and step not in only:
                continue
            offsets: Sequence[float]
            if whole:
                offsets, ordered = all_offsets, sorted(all_durations)
            else:
                window = [
                    (offset, duration)
                    for offset, duration in zip(all_offsets, all_durations, strict=True)
                    if since <= offset < until
                ]
                offsets = [offset for offset, _ in window]
                ordered = sorted(duration for _, duration in window)
            if not ordered:
                continue
            count = len(ordered)
            span = max(offsets) - min(offsets)
            steps[step] = {
                "count": count,
                "rate_per_s": round((count - 1) / span, 3) if count > 1 and span > 0 else 0.0,
                "mean_ms": _ms(math.fsum(ordered) / count),
                "p50_ms": _ms(percentile(ordered, 50)),
                "p90_ms": _ms(percentile(ordered, 90)),
                "p99_ms": _ms(percentile(ordered, 99)),
                "max_ms": _ms(ordered[-1]),
            }
        return steps

    def timeline(self, bucket: float = 1.0) -> dict[str, Any]:
        """The run cut into `bucket`-second slices since start, JSON-able, for plots and progress.

        Shape: {"started": float, "bucket_s": float,
                "t": [bucket start, s since start, ...],            # every list below aligns with t
                "steps": {step: {"per_s": [completions/s],
                                 "p50_ms": [ms or None], "p99_ms": [ms or None]}},
                "errors_per_s": {step: [failures/s, all kinds]},
                "gauges": {name: [value or None]}}    # None: no source has reported yet

        Things recorded before `started` count in the first bucket. The last bucket is usually
        cut short by the end of the run, so its rates read low.
        """
        if not bucket > 0:
            raise ValueError(f"bucket must be > 0 seconds, got {bucket!r}")
        n = self._bucket_count(bucket)
        steps: dict[str, dict[str, list[Any]]] = {}
        for step, (offsets, durations) in self._steps.items():
            slices: list[list[float]] = [[] for _ in range(n)]
            for offset, duration in zip(offsets, durations, strict=True):
                slices[_index(offset, bucket, n)].append(duration)
            for durations_in in slices:
                durations_in.sort()
            steps[step] = {
                "per_s": [round(len(s) / bucket, 3) for s in slices],
                "p50_ms": [_ms(percentile(s, 50)) if s else None for s in slices],
                "p99_ms": [_ms(percentile(s, 99)) if s else None for s in slices],
            }
        errors: dict[str, list[float]] = {}
        for step, kinds in self._errors.items():
            counts = [0] * n
            for offsets in kinds.values():
                for offset in offsets:
                    counts[_index(offset, bucket, n)] += 1
            errors[step] = [round(c / bucket, 3) for c in counts]
        return {
            "started": self.started,
            "bucket_s": bucket,
            "t": [round(i * bucket, 6) for i in range(n)],
            "steps": steps,
            "errors_per_s": errors,
            "gauges": self._gauge_series(bucket, n),
        }

    # -- internals ---------------------------------------------------------------------------

    def _offset(self, at: float | None) -> float:
        return round((time.time() if at is None else at) - self.started, 6)

    def _samples(self, step: str) -> tuple[array[float], array[float]]:
        samples = self._steps.get(step)
        if samples is None:
            samples = self._steps[step] = (array("d"), array("d"))
        return samples

    def _set_gauge(self, name: str, offset: float, value: float) -> None:
        samples = self._gauges.setdefault(name, {})
        second = math.floor(offset)
        previous = samples.get(second)
        # Latest by time, not by arrival: merges from several processes come in any order.
        if previous is None or offset >= previous[0]:
            samples[second] = (offset, value)

    def _last_offset(self) -> float | None:
        ends = [max(offsets) for offsets, _ in self._steps.values()]
        ends += [max(o) for kinds in self._errors.values() for o in kinds.values()]
        ends += [max(o for o, _ in samples.values()) for samples in self._gauges.values()]
        return max(ends, default=None)

    def _bucket_count(self, bucket: float) -> int:
        last = self._last_offset()
        return 0 if last is None else max(math.floor(last / bucket), 0) + 1

    def _gauge_series(self, bucket: float, n: int) -> dict[str, list[float | None]]:
        # Group `name@source` gauges under `name`; a plain `name` is a source of its own.
        sources: dict[str, list[list[tuple[float, float]]]] = {}
        for name, by_second in self._gauges.items():
            sources.setdefault(name.partition("@")[0], []).append(sorted(by_second.values()))
        series: dict[str, list[float | None]] = {}
        for name, per_source in sources.items():
            latest: list[float | None] = [None] * len(per_source)
            position = [0] * len(per_source)
            values: list[float | None] = []
            for i in range(n):
                for j, samples in enumerate(per_source):
                    while (
                        position[j] < len(samples)
                        and _index(samples[position[j]][0], bucket, n) <= i
                    ):
                        latest[j] = samples[position[j]][1]
                        position[j] += 1
                known = [value for value in latest if value is not None]
                values.append(round(math.fsum(known), 6) if known else None)
            series[name] = values
        return series


def _index(offset: float, bucket: float, n: int) -> int:
    """The bucket an offset falls in; early samples go to the first, rounding never overflows."""
    return min(max(math.floor(offset / bucket), 0), n - 1)
