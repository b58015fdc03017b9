"""AWS's own device SDK against our broker side (tests/awsiotsdk_cases.py), in a pytest
process of its own: a crash in the SDK's native code (awscrt) must fail this test with its
output, not take the whole suite down. A run killed by a signal is tried once more, so a
rare native crash is told apart from a real failure; a failing assertion is never retried."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fleet import AGENT_ENV, REPO

pytestmark = pytest.mark.stack

CASES = REPO / "tests" / "awsiotsdk_cases.py"


def run_cases() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        cwd=REPO,
        env=AGENT_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_aws_device_sdk_provisions_and_syncs_shadows_against_our_broker_side() -> None:
    result = run_cases()
    if result.returncode < 0 or result.returncode >= 128:  # killed by a signal: the SDK
        result = run_cases()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
