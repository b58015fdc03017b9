from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fleet import Fleet, running_fleet

#: Every test is in one layer: its own mark, or else its module's ``pytestmark``.
#: unit: in-process, no broker, no child but a trivial one (``scripts/test --fast``);
#: stack: a real Mosquitto with the plugin (and the services) driven by the test's own code;
#: commands: the installed commands (fleet-agent, fleet-broker, fleet-sim) run as processes.
LAYERS = ("unit", "stack", "commands")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--layer",
        action="append",
        choices=LAYERS,
        help="run only the tests of this layer (repeatable); scripts/test --fast is --layer unit",
    )


def layer_of(item: pytest.Item) -> str:
    for mark in item.iter_markers():  # the closest first: the test's own, then its module's
        if mark.name in LAYERS:
            return mark.name
    raise pytest.UsageError(
        f"{item.nodeid}: no layer; give its module a pytestmark of {', '.join(LAYERS)}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = config.getoption("--layer")
    layers = {item.nodeid: layer_of(item) for item in items}  # every test, also unselected
    if not wanted:
        return
    kept = [item for item in items if layers[item.nodeid] in wanted]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


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
