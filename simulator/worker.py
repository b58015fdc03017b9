"""One simulator process: its share of the fleet in one asyncio event loop.

Devices arrive on the scenario's schedule (this process's share of the rate), onboard with at
most its share of the concurrency cap in flight, then update their shadows on an interval
until told to stop. Twice a second the process sends what it measured since the last time to
the parent (`Recorder.drain`), with its counters and the things onboarded since.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import random
import resource
import signal
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from agent import wire
from agent.session import SessionError, tls_context
from broker import children
from simulator.ceiling import measure_connect_ceiling
from simulator.metrics import Recorder
from simulator.scenario import Scenario
from simulator.virtual_device import Counters, Target, VirtualDevice, jittered

REPORT_EVERY = 0.5
ONBOARDING_ATTEMPTS = 3
# Connects in flight per process while measuring the ceiling: enough to keep the broker's
# TLS busy; more would only queue and add latency, not rate.
CEILING_CONCURRENCY = 64


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    workers: int
    scenario: Scenario
    target: Target
    started: float  # the run's wall-clock start, shared by every process
    claim_files: tuple[tuple[Path, Path], ...]  # one shared pair, or one per device
    ceiling_window: tuple[float, float] | None = None  # wall clock: bare connects from, until


#: What a worker sends the parent: its figures so far (``"metrics"`` and the counts), or a
#: ``"fatal"`` error; always with its ``"worker"`` index. run.FleetState.absorb reads them.
WorkerMessage = dict[str, Any]


def worker_main(plan: WorkerPlan, out: Queue[WorkerMessage], stop: Event, storm: Event) -> None:
    """Process entry point. Ctrl-C and SIGTERM are the parent's to handle (a terminal, a
    ``timeout`` or a CI cancel signal the whole group): it sets ``stop``, and the devices
    disconnect and their figures reach the report. Should the parent die, even by SIGKILL,
    the kernel kills this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    children.die_with_parent(signal.SIGKILL, parent.pid if parent is not None else None)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Thousands of sessions allocate steadily and live long: with the default thresholds the
    # collector ran every few hundred allocations and took ~6% of the process (py-spy).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        asyncio.run(_Worker(plan, out, stop, storm).run())
    except Exception as exc:  # never a traceback from a worker: the parent reports it
        out.put({"worker": plan.index, "fatal": f"{type(exc).__name__}: {exc}"})


async def _cancel_all(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel until every task has ended: before Python 3.12 an asyncio.wait_for inside a
    task may swallow a cancellation that races a completion, and the task goes on."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


class _Worker:
    def __init__(
        self, plan: WorkerPlan, out: Queue[WorkerMessage], stop: Event, storm: Event
    ) -> None:
        self.plan = plan
        self.scenario = plan.scenario
        self.out = out
        self.stop = stop
        self.storm = storm
        self.recorder = Recorder(plan.ceiling_window[0] if plan.ceiling_window else plan.started)
        self.counters = Counters()
        self.devices: list[VirtualDevice] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self._sent_things = 0
        self.ceiling_connects: int | None = None
        # Memory before any device: the per-device cost is what grows beyond it.
        self.baseline_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Every plan.workers-th device is ours: arrivals interleave across processes.
        self.indexes = range(plan.index, self.scenario.devices, plan.workers)
        self.concurrency_share = max(1, self.scenario.concurrency // plan.workers)
        self.concurrency = asyncio.Semaphore(self.concurrency_share)
        self.claims = {
            pair: tls_context(plan.target.ca_file, pair[0], pair[1])
            for pair in (plan.claim_files if len(plan.claim_files) == 1 else ())
        }

    def _claim_context(self, index: int) -> Any:
        if self.claims:
            return next(iter(self.claims.values()))
        cert, key = self.plan.claim_files[index]
        return tls_context(self.plan.target.ca_file, cert, key)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reporter = asyncio.create_task(self._report_loop())
        arrivals = asyncio.create_task(self._ceiling_then_arrivals())
        extras = [asyncio.create_task(self._storm_watch())]
        if self.scenario.churn > 0:
            extras.append(asyncio.create_task(self._churn()))
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
        started_stop = loop.time()
        await _cancel_all({arrivals, *extras, *self.tasks})
        await asyncio.gather(*(d.close() for d in self.devices), return_exceptions=True)
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        self._send(final=True, stop_seconds=loop.time() - started_stop)

    # --------------------------------------------------------------- arrivals

    async def _ceiling_then_arrivals(self) -> None:
        window = self.plan.ceiling_window
        if window is not None:
            await asyncio.sleep(max(0.0, window[0] - time.time()))
            self.ceiling_connects = await measure_connect_ceiling(
                self.plan.target,
                self._claim_context(0),
                until=window[1],
                concurrency=min(CEILING_CONCURRENCY, self.concurrency_share),
                recorder=self.recorder,
                client_prefix=f"{wire.CLAIM_CLIENT_ID_PREFIX}ceiling-{self.plan.index}-{os.getpid()}",
            )
            self._send()
        await self._arrivals()

    async def _arrivals(self) -> None:
        for index in self.indexes:
            delay = self.plan.started + self.scenario.arrival_offset(index) - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.concurrency.acquire()  # the cap holds back arrivals, as it would
            self._spawn(self._arrive(index))

    async def _arrive(self, index: int) -> None:
        serial = f"{self.scenario.serial_prefix}-{index:06d}"
        device = VirtualDevice(
            serial, self.plan.target, self._claim_context(index), self.recorder, self.counters
        )
        try:
            for attempt in range(1, ONBOARDING_ATTEMPTS + 1):
                try:
                    await device.onboard()
                    break
                except Exception:  # recorded by kind inside; a real agent backs off and retries
                    if attempt == ONBOARDING_ATTEMPTS:
                        self.counters.failed += 1
                        return
                    await asyncio.sleep(random.uniform(0.5, 2.0) * attempt)
        finally:
            self.concurrency.release()
        self.devices.append(device)
        if self.scenario.update_interval > 0:
            self._spawn(self._updates(device))

    async def _updates(self, device: VirtualDevice) -> None:
        interval = self.scenario.update_interval
        await asyncio.sleep(jittered(interval))
        while True:
            await device.update(self.scenario.update_bytes)
            await asyncio.sleep(interval)

    # ------------------------------------------------------ churn and storms

    async def _reconnect(self, device: VirtualDevice) -> None:
        for attempt in range(1, ONBOARDING_ATTEMPTS + 1):
            try:
                async with self.concurrency:
                    await device.reconnect()
                return
            except SessionError:
                await asyncio.sleep(random.uniform(0.2, 1.0) * attempt)

    async def _churn(self) -> None:
        interval = self.plan.workers / self.scenario.churn
        while True:
            await asyncio.sleep(random.expovariate(1 / interval))
            online = [d for d in self.devices if d.session is not None]
            if online:
                device = random.choice(online)
                await device.drop()
                self._spawn(self._reconnect(device))

    async def _storm_watch(self) -> None:
        while not self.storm.is_set():
            await asyncio.sleep(0.05)
        online = [d for d in self.devices if d.session is not None]
        await asyncio.gather(*(d.drop() for d in online))
        for device in online:
            self._spawn(self._reconnect(device))

    # ----------------------------------------------------------------- reports

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self._send()

    def _send(self, *, final: bool = False, **extra: Any) -> None:
        things = self.counters.things[self._sent_things :]
        self._sent_things = len(self.counters.things)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open("/proc/self/statm") as statm:
            rss_kb = int(statm.read().split()[1]) * resource.getpagesize() // 1024
        self.out.put(
            {
                "worker": self.plan.index,
                "metrics": self.recorder.drain(),
                "connected": self.counters.connected,
                "onboarded": self.counters.onboarded,
                "failed": self.counters.failed,
                "things": things,
                "max_rss_kb": usage.ru_maxrss,
                "rss_kb": rss_kb,
                "ceiling_connects": self.ceiling_connects,
                "baseline_rss_kb": self.baseline_rss_kb,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "final": final,
                **extra,
            }
        )
