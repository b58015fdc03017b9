"""Where benchmark results go: one JSON line per run in bench/results/<name>.jsonl."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def latency_summary(seconds: list[float], prefix: str = "") -> dict[str, float]:
    """Median, p90 (nearest rank), min and max of durations, in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return {
        f"{prefix}median_ms": round(statistics.median(ms), 1),
        f"{prefix}p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
        f"{prefix}min_ms": round(ms[0], 1),
        f"{prefix}max_ms": round(ms[-1], 1),
    }


def record(name: str, result: dict[str, Any]) -> Path:
    """Append ``result`` with when and where it was measured; return the file."""
    line = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        **result,
    }
    print(json.dumps(line))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"appended to {out}")
    return out
