"""PNG plots of a run from `Recorder.timeline()`: rates over time, latency percentiles over time.

Built on `matplotlib.figure.Figure` rather than pyplot: no global figure registry to leak from, no
backend to select (a Figure saves PNG through Agg on its own), so it works headless, in any process,
and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Plotted on the second axis of rates.png: the level that explains the rates.
CONNECTED_GAUGE = "devices_connected"


def write_plots(timeline: dict[str, Any], folder: Path, title: str = "") -> list[Path]:
    """Write rates.png, latency.png and (with gauges) gauges.png into `folder`; return their paths.

    Steps without data are left out, and a plot with nothing to show is not written.
    """
    from matplotlib.figure import Figure  # imported here: only the report needs matplotlib

    folder.mkdir(parents=True, exist_ok=True)
    t = timeline["t"]
    steps = timeline["steps"]
    colours = _colours(list(steps))
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        fig.suptitle(title)
        path = folder / name
        fig.savefig(path, format="png", dpi=100)
        written.append(path)

    rated = {s: v["per_s"] for s, v in steps.items() if any(v["per_s"])}
    errors = [sum(rates) for rates in zip(*timeline["errors_per_s"].values(), strict=True)]
    connected = timeline["gauges"].get(CONNECTED_GAUGE)
    if rated or any(errors) or connected:
        fig = Figure(figsize=(11, 5.5), layout="constrained")
        ax = fig.add_subplot()
        for step, rates in rated.items():
            ax.plot(t, rates, label=step, color=colours[step], linewidth=1.2)
        if any(errors):
            ax.plot(t, errors, label="errors (all steps)", color="red", linestyle=":")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("completions per second")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if connected:
            right = ax.twinx()
            right.plot(t, _nan(connected), label=CONNECTED_GAUGE, color="black", linewidth=2)
            right.set_ylabel(CONNECTED_GAUGE)
            more = right.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        # Outside the axes: with a dozen steps an inside legend hides the lines.
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
        save(fig, "rates.png")

    timed = {s: v for s, v in steps.items() if any(p is not None for p in v["p50_ms"])}
    if timed:
        fig = Figure(figsize=(11, 5.5), layout="constrained")
        ax = fig.add_subplot()
        for step, v in timed.items():
            ax.plot(t, _nan(v["p50_ms"]), label=f"{step} p50", color=colours[step])
            ax.plot(t, _nan(v["p99_ms"]), label=f"{step} p99", color=colours[step], ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("ms (p50 solid, p99 dashed)")
        ax.grid(alpha=0.3, which="both")
        fig.legend(loc="outside right upper", fontsize="small")
        save(fig, "latency.png")

    gauges = {n: v for n, v in timeline["gauges"].items() if any(x is not None for x in v)}
    if gauges:
        # One panel each: broker bytes/s and a queue depth have nothing in common but time.
        fig = Figure(figsize=(11, 2.2 * len(gauges) + 0.8), layout="constrained")
        axes = fig.subplots(len(gauges), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (name, values) in zip(axes, gauges.items(), strict=True):
            ax.plot(t, _nan(values), color="black")
            ax.set_ylabel(name, fontsize="small")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("seconds since start")
        save(fig, "gauges.png")
    return written


def _nan(values: list[float | None]) -> list[float]:
    # Gaps (buckets without samples) become NaN, which matplotlib draws as breaks in the line.
    return [math.nan if v is None else v for v in values]


def _colours(steps: list[str]) -> dict[str, Any]:
    # One colour per step, the same in every plot, so p50/p99 pairs and rates read together.
    from matplotlib import colormaps

    palette = colormaps["tab20" if len(steps) > 10 else "tab10"]
    return {step: palette(i % palette.N) for i, step in enumerate(steps)}
