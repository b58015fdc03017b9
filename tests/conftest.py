from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fleet import Fleet, running_fleet


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Mosquitto with the plugin on an ephemeral port; the test plays the fleet services."""
    with running_fleet(services=False) as running:
        yield running


@pytest.fixture(autouse=True)
def _close_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "fleet" in request.fixturenames:
        request.getfixturevalue("fleet").close_clients()
