"""agent.handlers (HandlerSet, CommandHandler with real executables) and agent.reporters.

No broker: handlers are driven directly with asyncio.run, hooks are real scripts in tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.handlers import (
    Applied,
    CommandHandler,
    DesiredChange,
    HandlerFailed,
    HandlerSet,
    Step,
)
from agent.reporters import device_facts, device_reporter

pytestmark = pytest.mark.unit

T = TypeVar("T")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(factory())  # type: ignore[arg-type]


def apply(
    handlers: HandlerSet,
    delta: Mapping[str, Any],
    desired: Mapping[str, Any] | None = None,
    *,
    shadow: str | None = None,
) -> Applied:
    return run(lambda: handlers.apply("thing-1", shadow, delta, desired or dict(delta)))


class Recorder:
    """A handler that records the changes it gets and returns a fixed outcome."""

    def __init__(self, outcome: object = None) -> None:
        self.outcome = outcome
        self.calls: list[DesiredChange] = []

    def __call__(self, change: DesiredChange) -> Any:
        self.calls.append(change)
        return self.outcome


def script(tmp_path: Path, name: str, body: str, shebang: str = "#!/bin/sh") -> Path:
    """An executable file in tmp_path."""
    path = tmp_path / name
    path.write_text(f"{shebang}\n{body}")
    path.chmod(0o755)
    return path


def python_script(tmp_path: Path, name: str, body: str) -> Path:
    """A Python hook run by this interpreter (fast and always present)."""
    return script(tmp_path, name, body, shebang=f"#!{sys.executable}")


def call(handler: CommandHandler, change: DesiredChange) -> dict[str, Any]:
    return run(lambda: handler(change))


def pid_alive(pid: int) -> bool:
    """Running (a killed process waiting to be reaped, a zombie, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


CHANGE = DesiredChange("thing-1", "cfg", {"led": "on"}, {"led": "on", "fan": 2})

# ---------------------------------------------------------------------- HandlerSet


def test_keyed_handlers_get_only_their_keys() -> None:
    """Each handler sees only the delta keys it owns, plus the whole desired section."""
    led, fan = Recorder({"led": "on"}), Recorder({"fan": 3})
    handlers = HandlerSet()
    handlers.register(led, keys=["led"])
    handlers.register(fan, keys=("fan", "fan_mode"))
    desired = {"led": "on", "fan": 3, "other": 1}
    applied = apply(handlers, {"led": "on", "fan": 3}, desired, shadow="cfg")
    assert [c.delta for c in led.calls] == [{"led": "on"}]
    assert [c.delta for c in fan.calls] == [{"fan": 3}]
    change = led.calls[0]
    assert (change.thing, change.shadow, change.desired) == ("thing-1", "cfg", desired)
    assert applied == Applied({"led": "on", "fan": 3}, frozenset(), frozenset())


def test_handler_not_called_without_its_keys() -> None:
    """A handler whose keys are not in the delta is not run."""
    led, fan = Recorder({"led": 1}), Recorder({"fan": 1})
    handlers = HandlerSet()
    handlers.register(led, keys=["led"])
    handlers.register(fan, keys=["fan"])
    apply(handlers, {"fan": 1})
    assert led.calls == []
    assert len(fan.calls) == 1


def test_catch_all_gets_the_rest() -> None:
    """A handler registered without keys takes every key no other handler claims."""
    led, rest = Recorder({"led": 1}), Recorder({"a": 1, "b": 2})
    handlers = HandlerSet()
    handlers.register(rest)
    handlers.register(led, keys=["led"])
    applied = apply(handlers, {"led": 1, "a": 1, "b": 2})
    assert [c.delta for c in led.calls] == [{"led": 1}]
    assert [c.delta for c in rest.calls] == [{"a": 1, "b": 2}]
    assert applied.reported == {"led": 1, "a": 1, "b": 2}
    assert applied.unhandled == frozenset()
    rest.calls.clear()
    apply(handlers, {"led": 2})
    assert rest.calls == []


def test_overlapping_keys_rejected() -> None:
    """Two handlers cannot own the same key."""
    handlers = HandlerSet()
    handlers.register(Recorder(), keys=["a", "b"])
    with pytest.raises(ValueError, match="b"):
        handlers.register(Recorder(), keys=["b", "c"])
    handlers.register(Recorder(), keys=["c"])


def test_two_catch_alls_rejected() -> None:
    """Only one handler can take all remaining keys."""
    handlers = HandlerSet()
    handlers.register(Recorder())
    with pytest.raises(ValueError):
        handlers.register(Recorder())


def test_bad_unhandled_policy_rejected() -> None:
    """unhandled is "ignore" or "echo"."""
    with pytest.raises(ValueError):
        HandlerSet(unhandled="drop")  # type: ignore[arg-type]


def test_async_handler_awaited() -> None:
    """An async handler's result is awaited and reported."""

    async def fan(change: DesiredChange) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"fan": change.delta["fan"] * 10}

    handlers = HandlerSet()
    handlers.register(fan, keys=["fan"])
    assert apply(handlers, {"fan": 2}).reported == {"fan": 20}


def test_exception_marks_keys_failed_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    """A raising handler reports nothing and its keys fail; later handlers still run."""

    def broken(change: DesiredChange) -> dict[str, Any]:
        raise RuntimeError("secret detail")

    async def broken_async(change: DesiredChange) -> dict[str, Any]:
        raise HandlerFailed("no such device")

    after = Recorder({"c": 1})
    handlers = HandlerSet()
    handlers.register(broken, keys=["a", "b"])
    handlers.register(broken_async, keys=["d"])
    handlers.register(after, keys=["c"])
    with caplog.at_level(logging.ERROR, logger="fleet.agent.handlers"):
        applied = apply(handlers, {"a": 1, "b": 2, "c": 1, "d": 0})
    assert applied.failed == frozenset({"a", "b", "d"})
    assert applied.reported == {"c": 1}
    assert len(after.calls) == 1
    assert "no such device" in caplog.text  # a HandlerFailed's message is logged
    assert "RuntimeError" in caplog.text


@pytest.mark.parametrize("outcome", [[("a", 1)], "a", 1, True])
def test_non_mapping_return_fails(outcome: object) -> None:
    """A handler must return a mapping (or None): anything else marks its keys failed."""
    handlers = HandlerSet()
    handlers.register(Recorder(outcome), keys=["a"])
    handlers.register(Recorder({"b": 1}), keys=["b"])
    applied = apply(handlers, {"a": 1, "b": 1})
    assert applied.failed == frozenset({"a"})
    assert applied.reported == {"b": 1}


def test_none_return_reports_nothing() -> None:
    """None: applied (not failed), but nothing to report."""
    handlers = HandlerSet()
    handlers.register(Recorder(None), keys=["a"])
    assert apply(handlers, {"a": 1}) == Applied({}, frozenset(), frozenset())


def test_reached_state_may_differ_from_desired() -> None:
    """What the handler returns is reported, not what was asked for."""
    handlers = HandlerSet()
    handlers.register(Recorder({"temp": 19.5, "extra": {"x": 1}}), keys=["temp"])
    assert apply(handlers, {"temp": 21}).reported == {"temp": 19.5, "extra": {"x": 1}}


def test_unhandled_ignore() -> None:
    """Default: keys nobody handles are returned as unhandled and never reported."""
    handlers = HandlerSet()
    handlers.register(Recorder({"a": 1}), keys=["a"])
    applied = apply(handlers, {"a": 1, "x": 2, "y": {"z": 3}})
    assert applied.unhandled == frozenset({"x", "y"})
    assert applied.reported == {"a": 1}
    assert applied.failed == frozenset()


def test_unhandled_echo() -> None:
    """ "echo": keys nobody handles are reported as reached, as asked."""
    handlers = HandlerSet(unhandled="echo")
    handlers.register(Recorder({"a": 1}), keys=["a"])
    applied = apply(handlers, {"a": 1, "x": 2, "y": {"z": 3}})
    assert applied.unhandled == frozenset()
    assert applied.reported == {"a": 1, "x": 2, "y": {"z": 3}}
    assert apply(HandlerSet(unhandled="echo"), {"k": [1]}).reported == {"k": [1]}


def test_steps_give_each_outcome_as_its_handler_returns() -> None:
    """One step per handler in the order apply runs them, the keys nobody handles last."""
    handlers = HandlerSet()
    handlers.register(Recorder({"led": "on"}), keys=["led"])
    handlers.register(Recorder(None), keys=["fan"])
    handlers.register(Recorder([1]), keys=["bad"])

    async def main() -> list[Step]:
        delta = {"led": "on", "fan": 2, "bad": 1, "x": 0}
        return [step async for step in handlers.steps("thing-1", None, delta, delta)]

    assert run(main) == [
        Step(frozenset({"led"}), {"led": "on"}),
        Step(frozenset({"fan"}), {}),
        Step(frozenset({"bad"}), {}, failed=True),
        Step(frozenset({"x"}), {}, unhandled=True),
    ]


def test_steps_interrupted_keep_what_finished() -> None:
    """Cancelled while a handler runs (the connection ended): the steps before it are known,
    the interrupted handler's keys are in none of them (F1)."""
    started = asyncio.Event()

    async def stuck(change: DesiredChange) -> dict[str, Any]:
        started.set()
        await asyncio.Event().wait()
        return {}

    handlers = HandlerSet()
    handlers.register(Recorder({"led": "on"}), keys=["led"])
    handlers.register(stuck, keys=["fan"])
    handlers.register(Recorder({"door": "shut"}), keys=["door"])
    seen: list[Step] = []

    async def main() -> None:
        async def consume() -> None:
            delta = {"led": "on", "fan": 2, "door": "shut"}
            async for step in handlers.steps("thing-1", None, delta, delta):
                seen.append(step)

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(main)
    assert seen == [Step(frozenset({"led"}), {"led": "on"})]
    assert Applied.of(seen) == Applied({"led": "on"}, frozenset(), frozenset())


# ------------------------------------------------------------------ CommandHandler

ECHO_HOOK = """\
import json, os, sys
request = json.load(sys.stdin)
json.dump({"got": request, "thing": os.environ["FLEET_THING"],
           "shadow": os.environ["FLEET_SHADOW"], "path": os.environ.get("PATH")}, sys.stdout)
"""


def test_command_gets_json_and_environment(tmp_path: Path) -> None:
    """stdin: {thing, shadow, delta, desired}; env: the agent's plus FLEET_THING/SHADOW."""
    hook = CommandHandler(python_script(tmp_path, "echo-hook", ECHO_HOOK), timeout=10)
    reached = call(hook, CHANGE)
    assert reached["got"] == {
        "thing": "thing-1",
        "shadow": "cfg",
        "delta": {"led": "on"},
        "desired": {"led": "on", "fan": 2},
    }
    assert (reached["thing"], reached["shadow"]) == ("thing-1", "cfg")
    assert reached["path"] == os.environ.get("PATH")


def test_command_classic_shadow(tmp_path: Path) -> None:
    """The classic shadow is null in the JSON and an empty FLEET_SHADOW."""
    hook = CommandHandler(python_script(tmp_path, "echo-hook", ECHO_HOOK), timeout=10)
    reached = call(hook, DesiredChange("t2", None, {"a": 1}, {"a": 1}))
    assert reached["got"]["shadow"] is None
    assert reached["shadow"] == ""
    assert reached["thing"] == "t2"


def test_command_stdout_is_reached_state_via_handler_set(tmp_path: Path) -> None:
    """A shell hook's JSON stdout is what gets reported; empty output reports nothing."""
    led = script(tmp_path, "led", 'cat >/dev/null\necho \'{"led": "dim", "n": {"x": 1}}\'\n')
    quiet = script(tmp_path, "quiet", "cat >/dev/null\n")
    handlers = HandlerSet()
    handlers.register(CommandHandler(led, timeout=10), keys=["led"])
    handlers.register(CommandHandler(quiet, timeout=10), keys=["fan"])
    applied = apply(handlers, {"led": "on", "fan": 1})
    assert applied == Applied({"led": "dim", "n": {"x": 1}}, frozenset(), frozenset())


def test_command_nonzero_exit(tmp_path: Path) -> None:
    """A non-zero exit fails with the status and the first line of stderr."""
    path = script(tmp_path, "fails", "echo 'bad led' >&2\necho 'second line' >&2\nexit 3\n")
    with pytest.raises(HandlerFailed) as info:
        call(CommandHandler(path, timeout=10), CHANGE)
    message = str(info.value)
    assert str(path) in message
    assert "status 3" in message
    assert "bad led" in message
    assert "second line" not in message


def test_command_nonzero_exit_without_stderr(tmp_path: Path) -> None:
    """No stderr: the status alone."""
    with pytest.raises(HandlerFailed, match="status 7"):
        call(CommandHandler(script(tmp_path, "quiet-fail", "exit 7\n"), timeout=10), CHANGE)


def test_command_failure_marks_keys_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a HandlerSet a failing hook marks its keys failed and the reason is logged."""
    handlers = HandlerSet()
    path = script(tmp_path, "fails", "echo 'relay stuck' >&2\nexit 1\n")
    handlers.register(CommandHandler(path, timeout=10), keys=["relay"])
    with caplog.at_level(logging.ERROR, logger="fleet.agent.handlers"):
        applied = apply(handlers, {"relay": True})
    assert applied.failed == frozenset({"relay"})
    assert applied.reported == {}
    assert "relay stuck" in caplog.text


def test_command_timeout_kills_process(tmp_path: Path) -> None:
    """A hook that does not finish in time fails, and is killed (not left running)."""
    pid_file = tmp_path / "pid"
    path = script(tmp_path, "slow", f"echo $$ > {pid_file}\nexec sleep 5\n")
    with pytest.raises(HandlerFailed, match=r"did not finish within 0\.5 s"):
        call(CommandHandler(path, timeout=0.5), CHANGE)
    assert not pid_alive(int(pid_file.read_text()))


def test_command_timeout_kills_hook_children(tmp_path: Path) -> None:
    """A timed-out shell hook's children are killed with it."""
    child_file = tmp_path / "child"
    path = script(
        tmp_path, "slow-parent", f"sleep 5 >/dev/null 2>&1 &\necho $! > {child_file}\nwait\n"
    )
    try:
        with pytest.raises(HandlerFailed):
            call(CommandHandler(path, timeout=0.5), CHANGE)
        assert not pid_alive(int(child_file.read_text()))
    finally:
        if child_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(child_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize(
    ("output", "why"),
    [
        ("not json", "did not print a JSON object"),
        ('{"a": 1', "did not print a JSON object"),
        ("[1, 2]", "not an object"),
        ('"text"', "not an object"),
        ("null", "not an object"),
        ("42", "not an object"),
    ],
)
def test_command_bad_output(tmp_path: Path, output: str, why: str) -> None:
    """stdout must be one JSON object."""
    path = script(tmp_path, "bad-output", f"cat >/dev/null\nprintf '%s' '{output}'\n")
    with pytest.raises(HandlerFailed, match=why):
        call(CommandHandler(path, timeout=10), CHANGE)


def test_command_invalid_utf8_output(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are not JSON."""
    path = python_script(
        tmp_path, "binary", "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe{')\n"
    )
    with pytest.raises(HandlerFailed, match="JSON"):
        call(CommandHandler(path, timeout=10), CHANGE)


def test_command_missing_executable(tmp_path: Path) -> None:
    """A path that does not exist fails naming the path."""
    missing = tmp_path / "no-such-hook"
    with pytest.raises(HandlerFailed, match="no-such-hook") as info:
        call(CommandHandler(missing, timeout=10), CHANGE)
    assert str(missing) in str(info.value)


def test_command_not_executable(tmp_path: Path) -> None:
    """A file without the execute bit fails naming the path."""
    path = tmp_path / "not-exec"
    path.write_text("#!/bin/sh\necho '{}'\n")
    path.chmod(0o644)
    with pytest.raises(HandlerFailed) as info:
        call(CommandHandler(path, timeout=10), CHANGE)
    assert str(path) in str(info.value)


def test_command_handler_name(tmp_path: Path) -> None:
    """Logged under "command <path>" when registered without a name."""
    path = tmp_path / "hook"
    assert CommandHandler(path).__name__ == f"command {path}"


# ----------------------------------------------------------------------- reporters


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_device_facts_on_linux() -> None:
    """Version, host, OS, uptime, free disk and memory are there, as JSON."""
    facts = device_facts()
    for key in ("agent_version", "hostname", "os", "uptime_s", "disk_free_mb"):
        assert key in facts, key
    assert "memory_available_mb" in facts
    assert isinstance(facts["agent_version"], str) and facts["agent_version"]
    assert isinstance(facts["hostname"], str) and facts["hostname"]
    for key in ("uptime_s", "disk_free_mb", "memory_available_mb", "agent_uptime_s"):
        assert isinstance(facts[key], int) and not isinstance(facts[key], bool), key
        assert facts[key] >= 0, key
    assert json.loads(json.dumps(facts)) == facts


def test_device_facts_leaves_out_what_it_cannot_read(tmp_path: Path) -> None:
    """An unreadable disk path: no disk_free_mb, never a guess."""
    facts = device_facts(tmp_path / "does-not-exist")
    assert "disk_free_mb" not in facts
    assert "hostname" in facts


def test_device_reporter_nests_under_key(tmp_path: Path) -> None:
    """The reporter's patch has one top-level key holding the facts."""
    patch = device_reporter("sys", tmp_path)()
    assert list(patch) == ["sys"]
    assert "hostname" in patch["sys"]
    assert "disk_free_mb" in patch["sys"]
    assert list(device_reporter()()) == ["device"]
    json.dumps(patch)
