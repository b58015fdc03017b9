"""Desired-state handlers: how the device applies what the shadow's ``desired`` asks for.

The Python interface is one callable per set of top-level keys::

    def apply_led(change: DesiredChange) -> dict | None:
        set_led(change.delta["led"])          # do it for real
        return {"led": read_led()}            # the state reached: goes into ``reported``

    handlers.register(apply_led, keys=["led"])

``change.delta`` holds only the out-of-sync desired keys the handler owns; ``change.desired`` the
whole desired section as last known. The handler returns the state it *reached* (which may
differ from the one asked for) as a patch for ``reported``, or None to report nothing. It may be
``async``. An exception marks its keys as failed: nothing is reported for them and they are
tried again on the next delta, reconnect or report tick. A handler interrupted before it
returns (the connection ended, the agent stops) counts as not run: it gets its keys again.

A handler registered without keys takes every key no other handler claims. Keys nobody handles
are left alone (``unhandled = "ignore"``, the default: never report a state the device did not
reach) or echoed as reached (``"echo"``, for devices whose desired state is pure configuration).

`CommandHandler` is the same interface as an executable, configured in agent.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from agent.shadow import Document

log = logging.getLogger("fleet.agent.handlers")

Unhandled = Literal["ignore", "echo"]
UNHANDLED_POLICIES: Final[tuple[Unhandled, ...]] = ("ignore", "echo")
MAX_HOOK_OUTPUT: Final = 64 * 1024


@dataclass(frozen=True)
class DesiredChange:
    thing: str
    shadow: str | None  # None: the classic shadow
    delta: Document
    desired: Document


Handler = Callable[[DesiredChange], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None]


class HandlerFailed(Exception):
    """A handler could not apply its keys; the message says why."""


@dataclass(frozen=True)
class Step:
    """One handler's part of applying a delta: the keys it owned and what it reached."""

    keys: frozenset[str]
    reported: Document
    failed: bool = False
    unhandled: bool = False  # nobody handles these keys (left alone: unhandled = "ignore")


@dataclass(frozen=True)
class Applied:
    """The outcome of applying one delta."""

    reported: Document = field(default_factory=dict)
    failed: frozenset[str] = frozenset()
    unhandled: frozenset[str] = frozenset()

    @classmethod
    def of(cls, steps: Iterable[Step]) -> Applied:
        """The steps of one `HandlerSet.steps` together (the ones that finished, say)."""
        reported: Document = {}
        failed: set[str] = set()
        unhandled: set[str] = set()
        for step in steps:
            reported.update(step.reported)
            if step.failed:
                failed |= step.keys
            if step.unhandled:
                unhandled |= step.keys
        return cls(reported, frozenset(failed), frozenset(unhandled))


@dataclass(frozen=True)
class _Binding:
    handler: Handler
    keys: frozenset[str] | None
    name: str


class HandlerSet:
    """The handlers of one shadow."""

    def __init__(self, unhandled: Unhandled = "ignore") -> None:
        if unhandled not in UNHANDLED_POLICIES:
            raise ValueError(f"unhandled must be one of {UNHANDLED_POLICIES}")
        self.unhandled = unhandled
        self._bindings: list[_Binding] = []

    def register(
        self, handler: Handler, keys: Iterable[str] | None = None, *, name: str | None = None
    ) -> None:
        """``keys``: the top-level desired keys it owns; None for every key not otherwise owned."""
        owned = None if keys is None else frozenset(keys)
        if owned is not None:
            for binding in self._bindings:
                if binding.keys is not None and binding.keys & owned:
                    clash = ", ".join(sorted(binding.keys & owned))
                    raise ValueError(f"keys {clash} already belong to handler {binding.name}")
        elif any(b.keys is None for b in self._bindings):
            raise ValueError("only one handler can take all remaining keys")
        label = name or str(getattr(handler, "__name__", type(handler).__name__))
        self._bindings.append(_Binding(handler, owned, label))

    def _split(self, delta: Mapping[str, Any]) -> tuple[list[tuple[_Binding, Document]], Document]:
        claimed: set[str] = set()
        work: list[tuple[_Binding, Document]] = []
        for binding in self._bindings:
            if binding.keys is not None:
                mine = {k: v for k, v in delta.items() if k in binding.keys}
                claimed.update(mine)
                if mine:
                    work.append((binding, mine))
        rest = {k: v for k, v in delta.items() if k not in claimed}
        catch_all = next((b for b in self._bindings if b.keys is None), None)
        if catch_all is not None and rest:
            work.append((catch_all, rest))
            rest = {}
        return work, rest

    async def apply(
        self, thing: str, shadow: str | None, delta: Mapping[str, Any], desired: Mapping[str, Any]
    ) -> Applied:
        """Run the handlers owning ``delta``'s keys one after the other: keyed handlers in
        registration order, then the catch-all."""
        return Applied.of([step async for step in self.steps(thing, shadow, delta, desired)])

    async def steps(
        self, thing: str, shadow: str | None, delta: Mapping[str, Any], desired: Mapping[str, Any]
    ) -> AsyncIterator[Step]:
        """`apply`, one step per handler (then one for the keys nobody handles), each given as
        soon as its handler returns: a caller interrupted half-way knows what finished."""
        work, rest = self._split(delta)
        for binding, mine in work:
            yield await self._run(binding, DesiredChange(thing, shadow, mine, dict(desired)))
        if rest and self.unhandled == "echo":
            yield Step(frozenset(rest), dict(rest))
        elif rest:
            yield Step(frozenset(rest), {}, unhandled=True)

    @staticmethod
    async def _run(binding: _Binding, change: DesiredChange) -> Step:
        keys = frozenset(change.delta)
        try:
            outcome = binding.handler(change)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        except Exception as exc:
            detail = str(exc) if isinstance(exc, HandlerFailed) else type(exc).__name__
            log.error("handler %s failed on %s: %s", binding.name, ", ".join(sorted(keys)), detail)
            log.debug("handler %s traceback", binding.name, exc_info=True)
            return Step(keys, {}, failed=True)
        if outcome is None:
            return Step(keys, {})
        if not isinstance(outcome, Mapping):
            log.error("handler %s returned %s, not a mapping", binding.name, type(outcome))
            return Step(keys, {}, failed=True)
        return Step(keys, dict(outcome))


class CommandHandler:
    """An executable as a handler.

    It gets one JSON object on stdin: ``{"thing", "shadow", "delta", "desired"}`` and must print
    one JSON object on stdout, the state it reached (``{}`` for nothing). A non-zero exit, a
    timeout or output that is not a JSON object is a failure; the first line of stderr is
    logged. Environment: the agent's, plus FLEET_THING and FLEET_SHADOW.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.__name__ = f"command {path}"

    async def __call__(self, change: DesiredChange) -> Document:
        request = json.dumps(
            {
                "thing": change.thing,
                "shadow": change.shadow,
                "delta": change.delta,
                "desired": change.desired,
            }
        ).encode()
        env = dict(os.environ, FLEET_THING=change.thing, FLEET_SHADOW=change.shadow or "")
        try:
            # Its own process group, so a timeout kills whatever the hook started too.
            process = await asyncio.create_subprocess_exec(
                str(self.path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise HandlerFailed(f"cannot run {self.path}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(request), self.timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise HandlerFailed(f"{self.path} did not finish within {self.timeout:g} s") from None
        except BaseException:  # cancelled (the agent is stopping): leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
        if process.returncode != 0:
            first = err.decode(errors="replace").strip().splitlines()[:1]
            why = f": {first[0][:200]}" if first else ""
            raise HandlerFailed(f"{self.path} exited with status {process.returncode}{why}")
        if len(out) > MAX_HOOK_OUTPUT:
            raise HandlerFailed(f"{self.path} printed more than {MAX_HOOK_OUTPUT} bytes")
        try:
            reached = json.loads(out or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HandlerFailed(f"{self.path} did not print a JSON object") from None
        if not isinstance(reached, dict):
            raise HandlerFailed(f"{self.path} printed JSON that is not an object")
        return reached


class HandlerRegistry:
    """The handlers of every shadow the agent syncs; what a Python plugin registers into.

    A plugin named in agent.toml (``[shadow] plugins = ["my_device.shadow:setup"]``) is a
    callable taking this registry::

        def setup(registry: HandlerRegistry) -> None:
            registry.register(apply_led, keys=["led"])               # classic shadow
            registry.register(apply_config, shadow="config")         # a named shadow
    """

    def __init__(self, unhandled: Unhandled = "ignore") -> None:
        self.unhandled = unhandled
        self._sets: dict[str | None, HandlerSet] = {}

    def for_shadow(self, shadow: str | None) -> HandlerSet:
        if shadow not in self._sets:
            self._sets[shadow] = HandlerSet(self.unhandled)
        return self._sets[shadow]

    def register(
        self,
        handler: Handler,
        keys: Iterable[str] | None = None,
        *,
        shadow: str | None = None,
        name: str | None = None,
    ) -> None:
        self.for_shadow(shadow).register(handler, keys, name=name)

    def shadows(self) -> list[str | None]:
        return list(self._sets)


class PluginError(Exception):
    """A handler plugin named in the configuration cannot be loaded."""


def load_plugin(spec: str, registry: HandlerRegistry) -> None:
    """Import ``module:callable`` and let it register its handlers."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise PluginError(f"handler plugin {spec!r}: write it as module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(
            f"handler plugin {spec!r}: cannot import {module_name} ({exc}); is it installed "
            "in the agent's Python environment?"
        ) from None
    setup = getattr(module, attribute, None)
    if not callable(setup):
        raise PluginError(f"handler plugin {spec!r}: {module_name} has no function {attribute}")
    try:
        setup(registry)
    except ValueError as exc:
        raise PluginError(f"handler plugin {spec!r}: {exc}") from None
