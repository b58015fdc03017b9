"""Simulator measurements (simulator/metrics.py) and the report's plots (simulator/plots.py)."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from simulator.metrics import STEP_ORDER, Recorder, format_ms, percentile, step_label
from simulator.plots import write_plots

pytestmark = pytest.mark.unit

T0 = 1_700_000_000.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def roundtrip(value: Any) -> Any:
    # allow_nan=False: a NaN or infinity anywhere would make the report invalid JSON.
    return json.loads(json.dumps(value, allow_nan=False))


# -- percentiles ---------------------------------------------------------------------------------


def test_percentile_nearest_rank_known_values() -> None:
    # The textbook nearest-rank example.
    values = [15, 20, 35, 40, 50]
    assert [percentile(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    hundred = list(range(1, 101))
    assert [percentile(hundred, p) for p in (1, 29, 50, 90, 99, 100)] == [1, 29, 50, 90, 99, 100]
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.0


@pytest.mark.parametrize(("values", "p"), [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_refuses_nonsense(values: list[float], p: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, p)


def test_format_ms() -> None:
    assert format_ms(None) == "-"
    assert format_ms(0.844) == "0.84 ms"
    assert format_ms(12.34) == "12.3 ms"
    assert format_ms(1240.0) == "1.24 s"


# -- summary -------------------------------------------------------------------------------------


def test_summary_of_known_steps() -> None:
    rec = Recorder(T0)
    for i in range(100):  # 1..100 ms, one completion per second from t=1 s
        rec.observe("connack", (i + 1) / 1000, at=T0 + 1 + i)
    rec.observe("register_thing", 0.25, at=T0 + 5)
    summary = rec.summary()
    assert summary["steps"]["connack"] == {
        "count": 100,
        "rate_per_s": 1.0,  # 100 completions spread evenly over 99 s
        "mean_ms": 50.5,
        "p50_ms": 50.0,
        "p90_ms": 90.0,
        "p99_ms": 99.0,
        "max_ms": 100.0,
    }
    # One completion has no rate.
    assert summary["steps"]["register_thing"]["rate_per_s"] == 0.0
    assert summary["steps"]["register_thing"]["p99_ms"] == 250.0
    assert summary["span_s"] == 100.0
    assert summary["errors"] == {}
    assert summary["errors_total"] == 0


def test_empty_recorder() -> None:
    rec = Recorder(T0)
    assert rec.summary() == {
        "started": T0,
        "span_s": 0.0,
        "steps": {},
        "errors": {},
        "errors_total": 0,
        "error_messages": {},
        "gauges": {},
    }
    timeline = rec.timeline()
    assert timeline["t"] == []
    assert timeline["steps"] == timeline["errors_per_s"] == timeline["gauges"] == {}


@pytest.mark.parametrize("bad", [-0.001, float("nan")])
def test_observe_refuses_bad_durations(bad: float) -> None:
    with pytest.raises(ValueError, match="tls_handshake"):
        Recorder(T0).observe("tls_handshake", bad, at=T0)


def test_errors_counted_by_step_and_kind() -> None:
    rec = Recorder(T0)
    rec.error("connack", "timeout", at=T0 + 0.5)
    rec.error("connack", "timeout", at=T0 + 1.5)
    rec.error("connack", "refused", at=T0 + 1.7)
    rec.error("register_thing", "ResourceConflictsException", at=T0 + 2.1)
    summary = rec.summary()
    assert summary["errors"] == {
        "connack": {"timeout": 2, "refused": 1},
        "register_thing": {"ResourceConflictsException": 1},
    }
    assert summary["errors_total"] == 4
    assert rec.timeline()["errors_per_s"] == {
        "connack": [1.0, 2.0, 0.0],
        "register_thing": [0.0, 0.0, 1.0],
    }


# -- gauges --------------------------------------------------------------------------------------


def test_gauge_keeps_last_value_per_second_by_time() -> None:
    rec = Recorder(T0)
    rec.gauge("queue_depth", 5, at=T0 + 0.9)
    rec.gauge("queue_depth", 3, at=T0 + 0.2)  # arrives late but is older: ignored
    rec.gauge("queue_depth", 7, at=T0 + 1.1)
    rec.gauge("queue_depth", 2, at=T0 + 3.5)
    assert rec.timeline()["gauges"] == {"queue_depth": [5.0, 7.0, 7.0, 2.0]}
    assert rec.summary()["gauges"] == {"queue_depth": {"last": 2.0, "max": 7.0}}


def test_gauges_from_several_sources_are_summed() -> None:
    rec = Recorder(T0)
    rec.observe("onboarding", 0.1, at=T0 + 0.5)  # the run starts before any gauge
    rec.gauge("devices_connected@1", 10, at=T0 + 1.2)
    rec.gauge("devices_connected@2", 4, at=T0 + 2.5)
    rec.gauge("devices_connected@1", 12, at=T0 + 3.0)
    rec.gauge("devices_connected@2", 0, at=T0 + 4.0)
    # Each worker's last level carries forward until it reports again.
    assert rec.timeline()["gauges"] == {"devices_connected": [None, 10.0, 14.0, 16.0, 12.0]}
    assert rec.summary()["gauges"] == {"devices_connected": {"last": 12.0, "max": 16.0}}
    # Coarser buckets take each source's last value within the bucket.
    assert rec.timeline(2.0)["gauges"] == {"devices_connected": [10.0, 16.0, 12.0]}


# -- timeline ------------------------------------------------------------------------------------


def test_timeline_buckets() -> None:
    rec = Recorder(T0)
    rec.observe("suback", 0.004, at=T0 - 0.3)  # before the start: first bucket
    rec.observe("suback", 0.002, at=T0 + 0.5)
    rec.observe("suback", 0.010, at=T0 + 1.2)
    rec.observe("suback", 0.001, at=T0 + 3.9)
    timeline = rec.timeline()
    assert timeline["started"] == T0
    assert timeline["bucket_s"] == 1.0
    assert timeline["t"] == [0.0, 1.0, 2.0, 3.0]
    assert timeline["steps"]["suback"] == {
        "per_s": [2.0, 1.0, 0.0, 1.0],
        "p50_ms": [2.0, 10.0, None, 1.0],
        "p99_ms": [4.0, 10.0, None, 1.0],
    }
    coarse = rec.timeline(2.0)
    assert coarse["t"] == [0.0, 2.0]
    assert coarse["steps"]["suback"]["per_s"] == [1.5, 0.5]
    assert coarse["steps"]["suback"]["p99_ms"] == [10.0, 1.0]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_timeline_refuses_bad_bucket(bad: float) -> None:
    with pytest.raises(ValueError, match="bucket"):
        Recorder(T0).timeline(bad)


# -- drain and merge -----------------------------------------------------------------------------

STEPS = ["tcp_connect", "tls_handshake", "connack", "register_thing", "shadow_update"]
KINDS = ["timeout", "refused", "ResourceConflictsException"]


def random_events(rng: random.Random, n: int) -> list[tuple[str, str, float, float]]:
    events = []
    for _ in range(n):
        at = T0 + rng.uniform(-0.5, 30.0)
        what = rng.choices(["observe", "error", "gauge"], weights=[8, 1, 1])[0]
        if what == "observe":
            events.append((what, rng.choice(STEPS), rng.expovariate(1 / 0.02), at))
        elif what == "error":
            events.append((what, rng.choice(STEPS), rng.choice(KINDS), at))  # type: ignore[arg-type]
        else:
            events.append((what, f"queue_depth@{rng.randint(1, 3)}", rng.randint(0, 500), at))
    return events


def record(rec: Recorder, event: tuple[Any, ...]) -> None:
    what, name, value, at = event
    getattr(rec, what)(name, value, at=at)


@pytest.mark.parametrize("seed", range(8))
def test_merged_drains_equal_one_recorder(seed: int) -> None:
    rng = random.Random(seed)
    events = random_events(rng, rng.randint(1, 2000))
    whole = Recorder(T0)
    workers = [Recorder(T0) for _ in range(rng.randint(1, 4))]
    parent = Recorder(T0)
    for event in events:
        record(whole, event)
        record(rng.choice(workers), event)
        if rng.random() < 0.02:  # a worker sends its increment now and then
            parent.merge(roundtrip(rng.choice(workers).drain()))
    for worker in workers:
        parent.merge(roundtrip(worker.drain()))
        assert worker.summary()["steps"] == {}  # drained means forgotten
    assert parent.summary() == whole.summary()
    for bucket in (1.0, 0.25, 7.0):
        assert parent.timeline(bucket) == whole.timeline(bucket)


def test_drain_is_an_increment() -> None:
    rec = Recorder(T0)
    rec.observe("connack", 0.0123456789, at=T0 + 2.0000004)
    rec.error("connack", "timeout", at=T0 + 3)
    rec.gauge("devices_connected@0", 1, at=T0 + 3)
    assert rec.drain() == {
        "started": T0,
        "steps": {"connack": {"at": [2.0], "seconds": [0.012346]}},  # microseconds
        "errors": {"connack": {"timeout": [3.0]}},
        "error_messages": {},
        "gauges": {"devices_connected@0": {"at": [3.0], "value": [1.0]}},
    }
    assert rec.drain() == {
        "started": T0,
        "steps": {},
        "errors": {},
        "error_messages": {},
        "gauges": {},
    }
    rec.observe("connack", 0.5, at=T0 + 4)
    assert rec.drain()["steps"] == {"connack": {"at": [4.0], "seconds": [0.5]}}


def test_merge_rebases_another_start() -> None:
    worker = Recorder(T0 + 1.0)
    worker.observe("onboarding", 0.3, at=T0 + 2.25)
    worker.error("onboarding", "timeout", at=T0 + 3.5)
    worker.gauge("devices_connected", 1, at=T0 + 2.5)
    parent = Recorder(T0)
    parent.merge(worker.drain())
    snapshot = parent.drain()
    assert snapshot["steps"]["onboarding"]["at"] == [2.25]
    assert snapshot["errors"]["onboarding"]["timeout"] == [3.5]
    assert snapshot["gauges"]["devices_connected"]["at"] == [2.5]


def test_merge_refuses_a_torn_snapshot() -> None:
    snapshot = {"started": T0, "steps": {"connack": {"at": [1.0], "seconds": []}}}
    with pytest.raises(ValueError, match="connack"):
        Recorder(T0).merge(snapshot | {"errors": {}, "gauges": {}})


def test_reports_are_json() -> None:
    rng = random.Random(42)
    rec = Recorder(T0)
    for event in random_events(rng, 500):
        record(rec, event)
    for report in (rec.summary(), rec.timeline(), rec.timeline(0.5)):
        assert roundtrip(report) == report
    snapshot = rec.drain()
    assert roundtrip(snapshot) == snapshot


def test_samples_are_stored_compactly() -> None:
    # 10,000 devices x ~10 steps plus shadow traffic must stay a few MB: 16 bytes per completion.
    rec = Recorder(T0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):
            rec.observe(STEPS[i % len(STEPS)], 0.001 * (i % 97), at=T0 + i / 1000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 50_000 * 16 * 1.5


# -- plots ---------------------------------------------------------------------------------------


def small_timeline() -> dict[str, Any]:
    rec = Recorder(T0)
    for i in range(60):
        rec.observe("onboarding", 0.05 + 0.001 * i, at=T0 + i / 10)
        rec.observe("shadow_update", 0.004, at=T0 + i / 10 + 0.05)
        rec.gauge("devices_connected@1", i, at=T0 + i / 10)
    rec.observe("delta_delivery", 0.0, at=T0 + 2)  # zero milliseconds on a log scale
    rec.error("register_thing", "timeout", at=T0 + 3)
    rec.gauge("broker_bytes_received_per_s", 1234.5, at=T0 + 4)
    return rec.timeline()


def test_write_plots_writes_pngs(tmp_path: Path) -> None:
    folder = tmp_path / "report"  # created when missing
    paths = write_plots(roundtrip(small_timeline()), folder, title="10 devices")
    assert [p.name for p in paths] == ["rates.png", "latency.png", "gauges.png"]
    for path in paths:
        assert path.parent == folder
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_the_plots_name_their_series_in_words(tmp_path: Path) -> None:
    """The legends use the steps' labels (the tables' words), not the report's keys."""
    from PIL import Image

    rates, latency, _ = write_plots(roundtrip(small_timeline()), tmp_path)
    with Image.open(rates) as png:
        described = png.text["Description"]
    assert "whole onboarding" in described and "devices connected (simulator)" in described
    with Image.open(latency) as png:
        described = png.text["Description"]
    assert "shadow update round trip p99" in described
    assert "_" not in described, described


def test_write_plots_skips_what_has_no_data(tmp_path: Path) -> None:
    assert write_plots(Recorder(T0).timeline(), tmp_path) == []
    rec = Recorder(T0)
    rec.error("connack", "refused", at=T0 + 1)
    assert [p.name for p in write_plots(rec.timeline(), tmp_path)] == ["rates.png"]


def test_a_phase_and_a_subset_of_steps() -> None:
    recorder = Recorder(started=1000.0)
    for second in range(10):
        recorder.observe("shadow_update", 0.001 * (second + 1), at=1000.0 + second)
        recorder.observe("onboarding", 1.0, at=1000.0 + second)
    recorder.error("shadow_update", "timeout", at=1003.0)
    recorder.error("onboarding", "409", at=1004.0)
    hold = recorder.step_summary(since=5.0, until=8.0)
    assert hold["shadow_update"]["count"] == 3  # at 5, 6 and 7 s
    assert hold["shadow_update"]["max_ms"] == pytest.approx(8.0)
    assert recorder.step_summary(since=20.0) == {}
    assert set(recorder.step_summary(only=("onboarding",))) == {"onboarding"}
    assert recorder.step_summary() == recorder.summary()["steps"]
    assert recorder.errors_total() == 2 == recorder.summary()["errors_total"]


def test_plots_shade_phases_and_leave_out_gauges_that_never_moved(tmp_path: Path) -> None:
    rec = Recorder(T0)
    for i in range(30):
        rec.observe("shadow_update", 0.004, at=T0 + i)
        rec.gauge("services_requests_waiting", 0, at=T0 + i)  # flat zero: says nothing
        rec.gauge("devices_connected@1", min(i, 20), at=T0 + i)
    rec.observe("reconnect", 0.45, at=T0 + 25)  # the storm: one bucket, drawn with a marker
    phases = [("ramp", 0.0, 10.0), ("hold", 10.0, 24.0), ("storm", 24.0, 27.0)]
    paths = write_plots(rec.timeline(), tmp_path, title="30 devices", phases=phases)
    assert [p.name for p in paths] == ["rates.png", "latency.png", "gauges.png"]
    rec = Recorder(T0)
    rec.gauge("services_requests_waiting", 0, at=T0 + 1)
    assert write_plots(rec.timeline(), tmp_path / "flat") == []


def test_the_first_message_of_each_error_kind_survives_drain_and_merge() -> None:
    worker, parent = Recorder(T0), Recorder(T0)
    worker.error("connect", "TLS failure", at=T0 + 1, message="self-signed certificate (check ca)")
    worker.error("connect", "TLS failure", at=T0 + 2, message="a later one")
    parent.merge(roundtrip(worker.drain()))
    worker.error("connect", "TLS failure", at=T0 + 3, message="after the drain")
    parent.merge(roundtrip(worker.drain()))
    summary = parent.summary()
    assert summary["errors"] == {"connect": {"TLS failure": 3}}
    assert summary["error_messages"] == {
        "connect": {"TLS failure": "self-signed certificate (check ca)"}
    }


def test_every_step_has_a_human_label() -> None:
    """Tables and report.json's "label" name steps as the README does; keys stay snake_case."""
    labels = {step: step_label(step) for step in STEP_ORDER}
    assert all("_" not in label for label in labels.values()), labels
    assert labels["connack"] == "CONNECT -> CONNACK"
    assert labels["create_certificate"] == "CreateCertificateFromCsr"
    assert step_label("some_new_step") == "some new step"
