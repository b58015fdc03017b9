"""The device agent assembled from its configuration: what ``fleet-agent run`` and
``fleet-agent shadow`` execute.

`build_runtime` wires the handlers (Python plugins and the command hook), the report queues in
the state folder and the built-in reporters into a `DeviceRuntime`. `serve_device` runs it with
the control socket; `one_shot` connects once for a command at the device while no daemon runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from agent import control
from agent.config import AgentConfig
from agent.handlers import CommandHandler, HandlerRegistry, HandlerSet, PluginError, load_plugin
from agent.keystore import Keystore, KeystoreError, Provisioned
from agent.onboarding import prove_certificate
from agent.provisioning import RetryPolicy
from agent.renewal import RenewalFailed, RenewalRequest, Renewer
from agent.reporters import device_reporter
from agent.runtime import DeviceRuntime, RuntimeSettings, refuses_identity
from agent.session import Session, SessionError, connect, tls_context, wait_future
from agent.shadow import ReportQueueFull
from agent.shadow_sync import FileQueueStore, ShadowSync

T = TypeVar("T")


class SetupError(Exception):
    """The configuration cannot be turned into a running agent; the message says why."""


@dataclass(frozen=True)
class Device:
    config: AgentConfig
    keystore: Keystore
    provisioned: Provisioned

    @property
    def thing(self) -> str:
        return self.provisioned.record.thing_name

    def settings(self) -> RuntimeSettings:
        return RuntimeSettings(
            endpoint=self.config.broker.endpoint,
            port=self.config.broker.port,
            ca_file=self.config.broker.ca_file,
            thing=self.thing,
            cert_file=self.provisioned.cert_path,
            key_file=self.provisioned.key_path,
            report_interval=self.config.shadow.report_interval,
            timeout=self.config.provisioning.timeout,
            keepalive=self.config.agent.keepalive,
        )

    async def connect(self) -> Session:
        """One connection as the thing with its current certificate."""
        settings = self.settings()
        return await connect(
            settings.endpoint,
            settings.port,
            client_id=settings.thing,
            context=tls_context(settings.ca_file, settings.cert_file, settings.key_file),
            timeout=settings.timeout,
        )

    def renewer(self) -> Renewer:
        provisioning = self.config.provisioning
        request = RenewalRequest(
            endpoint=self.config.broker.endpoint,
            port=self.config.broker.port,
            template=provisioning.template,
            parameters=provisioning.parameters,
            key_type=provisioning.key_type,
            common_name=provisioning.common_name,
            timeout=provisioning.timeout,
            retry=RetryPolicy(max_attempts=provisioning.max_attempts),
        )
        return Renewer(self.keystore, self.thing, request, self.config.renewal)

    def queue_store(self, shadow: str | None) -> FileQueueStore:
        return FileQueueStore(self.keystore.root / "shadows", shadow)

    def shadow_sync(self, shadow: str | None, handlers: HandlerSet | None = None) -> ShadowSync:
        """A sync of ``shadow`` on the state folder's queue (no handlers unless given)."""
        return ShadowSync(
            self.thing,
            shadow,
            handlers or HandlerSet("ignore"),
            self.queue_store(shadow),
            timeout=self.config.provisioning.timeout,
            max_queue_bytes=self.config.shadow.queue_max_bytes,
        )


def handler_registry(config: AgentConfig) -> HandlerRegistry:
    """Plugins first, then the command hook on every synced shadow."""
    section = config.shadow
    registry = HandlerRegistry(section.unhandled)
    for spec in section.plugins:
        try:
            load_plugin(spec, registry)
        except PluginError as exc:
            raise SetupError(str(exc)) from None
    stray = [s for s in registry.shadows() if s not in section.shadows]
    if stray:
        names = ", ".join(s or "classic" for s in stray)
        raise SetupError(
            f"handler plugins registered handlers for shadow(s) {names} that the agent does not "
            "sync; add them to shadow.names (or set shadow.classic = true)"
        )
    if section.command is not None:
        hook = CommandHandler(section.command, section.command_timeout)
        for shadow in section.shadows:
            try:
                registry.register(hook, section.command_keys or None, shadow=shadow)
            except ValueError as exc:
                raise SetupError(f"shadow.command: {exc}") from None
    return registry


def build_runtime(device: Device) -> DeviceRuntime:
    section = device.config.shadow
    registry = handler_registry(device.config)
    syncs = [device.shadow_sync(shadow, registry.for_shadow(shadow)) for shadow in section.shadows]
    reporters = (
        [device_reporter(section.facts_key, disk_path=device.keystore.root)]
        if section.facts_key
        else []
    )
    return DeviceRuntime(device.settings(), syncs, reporters, renewer=device.renewer())


def control_operations(runtime: DeviceRuntime) -> dict[str, control.Operation]:
    def sync_of(request: dict[str, Any]) -> ShadowSync:
        try:
            return runtime.sync(request.get("shadow"))
        except KeyError as exc:
            raise control.ControlError(str(exc.args[0]), permanent=True) from None

    async def status(_: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "status": runtime.status()}

    async def get(request: dict[str, Any]) -> dict[str, Any]:
        sync = sync_of(request)
        if runtime.session is None:
            raise control.ControlError(
                f"the agent is not connected ({runtime.last_error or runtime.state}); "
                "try again later"
            )
        try:
            document = await sync.refresh()
        except Exception as exc:
            raise control.ControlError(str(exc)) from None
        return {"ok": True, "document": document}

    async def report(request: dict[str, Any]) -> dict[str, Any]:
        sync = sync_of(request)
        patch = request.get("patch")
        if not isinstance(patch, dict) or not patch:
            raise control.ControlError("report needs a non-empty patch object", permanent=True)
        rejected_before = len(sync.rejections)
        try:
            changed = await sync.report(patch)
        except ReportQueueFull as exc:
            raise control.ControlError(str(exc)) from None
        wait = float(request.get("wait", 10.0))
        sent = await sync.wait_sent(wait) if changed else True
        answer: dict[str, Any] = {
            "ok": True,
            "changed": changed,
            "sent": sent,
            "version": sync.tracker.version,
        }
        if len(sync.rejections) > rejected_before:
            last = sync.rejections[-1]
            answer["rejected"] = {"code": last.code, "message": last.message}
        return answer

    async def renew(request: dict[str, Any]) -> dict[str, Any]:
        if runtime.renewer is None:
            raise control.ControlError("this agent has no renewal configured")
        outcome = runtime.renewer.force()

        def unfinished() -> Exception:
            return control.ControlError(
                f"renewal not finished yet ({runtime.last_error or runtime.state}); it goes on "
                "in the background: see fleet-agent status"
            )

        try:
            renewed = await wait_future(outcome, float(request.get("wait", 60.0)), unfinished)
        except RenewalFailed as exc:
            raise control.ControlError(f"renewal failed: {exc}") from None
        return {"ok": True, "certificate_id": renewed.record.certificate_id}

    return {"status": status, "get": get, "report": report, "renew": renew}


async def serve_device(device: Device, stop: asyncio.Event) -> None:
    """The daemon: control socket + runtime until ``stop``. The caller holds the lock."""
    runtime = build_runtime(device)
    socket_path = device.config.agent.socket_path
    try:
        # A missing folder is made private; an existing one (a volume, systemd's
        # RuntimeDirectory=) keeps its mode. The socket itself is 0600 either way.
        socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        server = await control.serve(socket_path, control_operations(runtime))
    except OSError as exc:
        raise SetupError(
            f"cannot listen on the control socket {socket_path} (agent.control_socket): "
            f"{exc.strerror or exc}"
        ) from None
    try:
        await runtime.run(stop)
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        socket_path.unlink(missing_ok=True)


async def one_shot(
    device: Device, shadow: str | None, action: Callable[[ShadowSync], Awaitable[T]]
) -> T:
    """Connect once as the thing, run ``action`` on ``shadow``'s sync (attached, subscribed,
    not serving: desired state is the daemon's job) and disconnect. The caller holds the
    lock."""
    settings = device.settings()
    sync = device.shadow_sync(shadow)
    session = await device.connect()
    try:
        sync.attach(session)
        await session.subscribe(*sync.subscriptions(), timeout=settings.timeout)
        return await action(sync)
    finally:
        await session.disconnect()


async def renew_once(device: Device) -> Provisioned:
    """``fleet-agent renew`` with no daemon: connect as the thing, obtain and stage a new
    certificate, prove it with a connection of its own, switch. The caller holds the lock.
    Raises RenewalFailed (the old certificate kept) or SessionError (not connected)."""
    settings = device.settings()
    renewer = device.renewer()
    session = await device.connect()
    try:
        staged = await renewer.renew(session)
    finally:
        await session.disconnect()
    try:
        context = tls_context(settings.ca_file, staged.cert_path, staged.key_path)
        await prove_certificate(
            settings.endpoint, settings.port, context, settings.thing, settings.timeout
        )
    except SessionError as exc:
        # Refused or unreachable: which one cannot always be told from here, and a staged set
        # the broker may already have seen must not be thrown away unless it was refused.
        if refuses_identity(exc):
            renewer.refused(str(exc))
            raise RenewalFailed(f"the broker refused the new certificate: {exc}") from None
        raise RenewalFailed(
            f"could not connect with the new certificate ({exc}); it stays staged and is "
            "tried first on the next connection"
        ) from None
    try:
        return renewer.proven()
    except (KeystoreError, OSError) as exc:
        raise RenewalFailed(f"could not switch to the new certificate: {exc}") from None
