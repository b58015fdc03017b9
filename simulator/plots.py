"""PNG plots of a run from `Recorder.timeline()`: rates over time, latency percentiles over time.

Built on `matplotlib.figure.Figure` rather than pyplot: no global figure registry to leak from, no
backend to select (a Figure saves PNG through Agg on its own), so it works headless, in any process,
and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulator.metrics import step_label

# Plotted on the second axis of rates.png: the level that explains the rates.
CONNECTED_GAUGE = "devices_connected"
#: Axis labels for the gauges a run records; others are shown with spaces for underscores.
GAUGE_LABELS = {
    "devices_connected": "devices connected (simulator)",
    "broker_clients_connected": "clients connected (broker)",
    "broker_msgs_received_per_min": "msgs received /min (broker, 1 min avg)",
    "broker_msgs_sent_per_min": "msgs sent /min (broker, 1 min avg)",
    "broker_msgs_received_per_s": "msgs received /s (broker)",
    "broker_msgs_sent_per_s": "msgs sent /s (broker)",
    "broker_stored_messages": "messages stored (broker)",
    "services_requests_waiting": "requests waiting (services)",
    "services_provisioning_in_pool": "provisioning in pool (services)",
    "services_replies_queued": "replies queued (services)",
    "services_replies_in_flight": "replies in flight (services)",
}
#: A series with this few points is drawn with markers: a 1 s burst (the reconnect storm)
#: is otherwise a line nobody sees.
SPARSE_POINTS = 12
Phase = tuple[str, float, float]  # name, start and end in seconds since the run's start


def write_plots(
    timeline: dict[str, Any], folder: Path, title: str = "", phases: Sequence[Phase] = ()
) -> list[Path]:
    """Write rates.png, latency.png and (with gauges) gauges.png into `folder`; return their paths.

    Steps without data are left out, and a plot with nothing to show is not written; ``phases``
    (ramp, hold, storm, ...) are shaded bands on every plot.
    """
    from matplotlib.figure import Figure  # imported here: only the report needs matplotlib

    folder.mkdir(parents=True, exist_ok=True)
    t = timeline["t"]
    steps = timeline["steps"]
    colours = _colours(list(steps))
    written: list[Path] = []

    def save(fig: Figure, name: str, what: str) -> None:
        heading = f"{title}: {what}" if title else what
        fig.suptitle(heading)
        path = folder / name
        # The series named in the PNG's text too: for a reader without the picture.
        series = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
        metadata = {"Title": heading, "Description": "series: " + "; ".join(series)}
        fig.savefig(path, format="png", dpi=100, metadata=metadata)
        written.append(path)

    rated = {s: v["per_s"] for s, v in steps.items() if any(v["per_s"])}
    errors = [sum(rates) for rates in zip(*timeline["errors_per_s"].values(), strict=True)]
    connected = timeline["gauges"].get(CONNECTED_GAUGE)
    if rated or any(errors) or connected:
        fig = Figure(figsize=(11, 5.5), layout="constrained")
        ax = fig.add_subplot()
        _bands(ax, phases)
        for step, rates in rated.items():
            ax.plot(t, rates, label=step_label(step), linewidth=1.2, **_style(rates, colours[step]))
        if any(errors):
            ax.plot(t, errors, label="errors (all steps)", color="red", linestyle=":")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("completions per second")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if connected:
            right = ax.twinx()
            gauge = GAUGE_LABELS[CONNECTED_GAUGE]
            right.plot(t, _nan(connected), label=gauge, color="black", linewidth=2)
            right.set_ylabel(gauge)
            more = right.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        # Outside the axes: with a dozen steps an inside legend hides the lines.
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
        save(fig, "rates.png", "completions per second")

    timed = {s: v for s, v in steps.items() if any(p is not None for p in v["p50_ms"])}
    if timed:
        fig = Figure(figsize=(11, 5.5), layout="constrained")
        ax = fig.add_subplot()
        _bands(ax, phases)
        for step, v in timed.items():
            style = _style(v["p50_ms"], colours[step])
            ax.plot(t, _nan(v["p50_ms"]), label=f"{step_label(step)} p50", **style)
            ax.plot(t, _nan(v["p99_ms"]), label=f"{step_label(step)} p99", ls="--", **style)
        ax.set_yscale("log")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("ms (p50 solid, p99 dashed)")
        ax.grid(alpha=0.3, which="both")
        fig.legend(loc="outside right upper", fontsize="small")
        save(fig, "latency.png", "latency per 1 s bucket")

    # A gauge that never left zero says nothing: it is left out, not drawn flat.
    gauges = {n: v for n, v in timeline["gauges"].items() if any(x for x in v if x is not None)}
    if gauges:
        # One panel each: broker bytes/s and a queue depth have nothing in common but time.
        fig = Figure(figsize=(11, 2.2 * len(gauges) + 0.8), layout="constrained")
        axes = fig.subplots(len(gauges), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (name, values) in zip(axes, gauges.items(), strict=True):
            _bands(ax, phases, labels=ax is axes[0])
            ax.plot(t, _nan(values), **_style(values, "black"))
            ax.set_ylabel(GAUGE_LABELS.get(name, name.replace("_", " ")), fontsize="small")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("seconds since start")
        save(fig, "gauges.png", "levels over time")
    return written


def _style(values: Sequence[float | None], colour: Any) -> dict[str, Any]:
    points = sum(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in values)
    if points <= SPARSE_POINTS:
        return {"color": colour, "marker": "o", "markersize": 4}
    return {"color": colour}


def _bands(ax: Any, phases: Sequence[Phase], *, labels: bool = True) -> None:
    """Shade each phase and name it at the top of the axes."""
    shades = ("#f2f2f2", "#e3ecf7", "#f7e9e3", "#e8f4e6")
    for i, (name, start, end) in enumerate(phases):
        if end <= start:
            continue
        ax.axvspan(start, end, color=shades[i % len(shades)], zorder=0)
        if labels:
            ax.text(
                (start + end) / 2,
                1.0,
                name,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize="x-small",
                color="#555555",
            )


def _nan(values: list[float | None]) -> list[float]:
    # Gaps (buckets without samples) become NaN, which matplotlib draws as breaks in the line.
    return [math.nan if v is None else v for v in values]


def _colours(steps: list[str]) -> dict[str, Any]:
    # One colour per step, the same in every plot, so p50/p99 pairs and rates read together.
    # tab10 then Dark2: 18 colours no two alike (tab20's pairs are two shades of one hue).
    from matplotlib import colormaps

    palette = [colormaps["tab10"](i) for i in range(10)]
    palette += [colormaps["Dark2"](i) for i in range(8)]
    return {step: palette[i % len(palette)] for i, step in enumerate(steps)}
