"""Where benchmark results go: one JSON line per run in bench/results/<name>.jsonl."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


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
