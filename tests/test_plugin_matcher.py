"""The plugin's own topic matcher (broker/plugin/topic_match.c) against its C unit tests
(tests/plugin/test_topic_match.c): built with the plugin's warning flags and run here. The
plugin uses it for its policy (a rule covering a subscription filter, "%t" for the
connection's own thing); a plain filter-matches-topic check uses Mosquitto's own."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "broker" / "plugin"


def test_the_topic_matcher_passes_its_c_unit_tests(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "no C compiler: scripts/setup installs build-essential"
    binary = tmp_path / "test_topic_match"
    build = subprocess.run(
        [
            compiler,
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-std=gnu11",
            f"-I{PLUGIN}",
            "-o",
            str(binary),
            str(REPO / "tests" / "plugin" / "test_topic_match.c"),
            str(PLUGIN / "topic_match.c"),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith(" cases, 0 failed"), run.stdout
