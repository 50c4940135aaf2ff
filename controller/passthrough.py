"""Binding registered devices to vfio-pci, attaching them to instances, and giving them back."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import structlog

from controller.agents import AgentClients, Identity, Move
from controller.devices import Devices, DeviceView
from controller.hosts import FunctionState, HostDirectory
from controller.registry import DeviceRecord, Registry, device_in_use
from devpass.errors import (
    DeviceNotPresent,
    DevpassError,
    IdentityMismatch,
    InvalidArgument,
    PciDeviceNotFound,
)
from devpass.names import MAX_NAME_LENGTH

log = structlog.get_logger()

VFIO_DRIVER = "vfio-pci"
# Instance ids come from VM managers (names, UUIDs, "namespace:name"), so ':' is allowed.
_INSTANCE_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.:-]*$")


@dataclass(frozen=True)
class BindResult:
    device: DeviceView
    # Other functions of the group that moved with the device.
    group_bound: list[str]


@dataclass(frozen=True)
class ReleaseResult:
    device: DeviceView
    # Driver the device went back to; empty when devpass had not bound it or it had none.
    restored_driver: str
    # Group siblings given back with the device, as "address driver".
    group_restored: list[str] = field(default_factory=list)


class Passthrough:
    """Drive the agents' binds and restores and keep the registry's record of them.

    The registry's `bound_by_devpass` and `original_driver` record what devpass did to a
    device; `attached_to` records the instance that uses it. Nothing here writes to a host
    directly: agents do, after their own safety checks.
    """

    def __init__(
        self, devices: Devices, registry: Registry, hosts: HostDirectory, agents: AgentClients
    ) -> None:
        self._devices = devices
        self._registry = registry
        self._hosts = hosts
        self._agents = agents
        self._reconciling: set[str] = set()

    async def register_and_bind(
        self,
        host: str,
        pci_address: str,
        name: str,
        *,
        include_group: bool,
        force: bool,
        request_id: str = "",
    ) -> BindResult:
        """Register the device and bind it; on any bind failure the entry is removed again.

        The entry is stored before the bind, so of two callers racing for one name, the
        loser fails on the name and never touches the hardware.

        Raises:
            Everything `Devices.register` and `bind` raise.
        """
        view = await self._devices.register(host, pci_address, name, request_id)
        try:
            return await self._bind_record(view.record, include_group=include_group, force=force)
        except DevpassError:
            await self._registry.remove_device(view.record.id)
            log.info("device_registration_undone", name=view.record.name, pci_address=view.record.pci_address)
            await self._devices.events.emit("removed", record=view.record, detail="the bind failed")
            raise

    async def bind(self, id_or_name: str, *, include_group: bool, force: bool) -> BindResult:
        """Bind a registered device to vfio-pci.

        Raises:
            DeviceNotFound, HostUnavailable, IdentityMismatch (and the entry turns stale),
            and the agent's refusals: VfioUnavailable, IommuGroupNotViable, HostCriticalDevice,
            DeviceBusy, SriovPfHasVfs, WritePending, WriteTimedOut, BindFailed.
        """
        record = await self._devices.find_record(id_or_name)

        return await self._bind_record(record, include_group=include_group, force=force)

    async def unbind(self, id_or_name: str) -> ReleaseResult:
        """Give a device that devpass bound back to its original driver.

        Raises:
            DeviceNotFound, DeviceInUse, HostUnavailable, IdentityMismatch, WriteTimedOut,
            BindFailed.
        """
        record = await self._devices.find_record(id_or_name)
        if record.attached_to:
            raise device_in_use(record)

        moves = await self._restore(record)

        return ReleaseResult(await self._current(record), moves[0].driver, _describe(moves[1:]))

    async def attach(
        self, id_or_name: str, instance_id: str, *, include_group: bool, force: bool
    ) -> DeviceView:
        """Bind the device if needed and record `instance_id` as its holder.

        Raises:
            InvalidArgument: the instance id is malformed.
            DeviceInUse: the device is attached already.
            DeviceNotPresent: the host no longer shows the device.
            Everything `bind` raises; the attachment is released again then.
        """
        if not instance_id or len(instance_id) > MAX_NAME_LENGTH or not _INSTANCE_ID.match(instance_id):
            raise InvalidArgument(
                f"invalid instance_id {instance_id[:80]!r}: name the instance that takes the device with "
                f"1 to {MAX_NAME_LENGTH} characters from letters, digits, '_', '.', ':' and '-'",
                instance_id=instance_id[:80],
            )
        record = await self._devices.find_record(id_or_name)
        await self._require_present(record)

        claimed = await self._registry.claim_attachment(record.id, instance_id)
        try:
            view = self._devices.view(claimed)
            if not view.bound_to_vfio:
                await self._bind_record(claimed, include_group=include_group, force=force)
        except DevpassError:
            await self._registry.release_attachment(record.id)
            raise
        log.info("device_attached", name=record.name, instance_id=instance_id)
        await self._devices.events.emit("attached", record=record, detail=instance_id)

        return await self._current(record)

    async def detach(self, id_or_name: str) -> DeviceView:
        """Clear the device's attachment; the device stays bound to vfio-pci."""
        record = await self._devices.find_record(id_or_name)
        if record.attached_to:
            await self._registry.release_attachment(record.id)
            log.info("device_detached", name=record.name, instance_id=record.attached_to)
            await self._devices.events.emit("detached", record=record, detail=record.attached_to)

        return await self._current(record)

    async def unregister(self, id_or_name: str, *, force: bool) -> ReleaseResult:
        """Give the device back to its driver if devpass bound it, then delete the entry.

        A device the host no longer shows is unregistered without any write. With
        `force`, an attached device is unregistered too, and a failed restore does not
        keep the entry.

        Raises:
            DeviceNotFound, DeviceInUse, and the restore's errors unless `force`.
        """
        record = await self._devices.find_record(id_or_name)
        if record.attached_to and not force:
            raise device_in_use(record)

        moves: list[Move] = []
        if self._devpass_bound(record) and self._devices.view(record).present:
            try:
                moves = await self._restore(record)
            except DevpassError as err:
                if not force:
                    raise
                log.warning(
                    "device_restore_skipped",
                    name=record.name,
                    pci_address=record.pci_address,
                    reason=err.reason,
                    error=err.message,
                    check="the device may still be on vfio-pci; give it back to its driver by hand",
                )

        restored = moves[0].driver if moves else ""

        return ReleaseResult(await self._devices.remove(record), restored, _describe(moves[1:]))

    async def _bind_record(self, record: DeviceRecord, *, include_group: bool, force: bool) -> BindResult:
        if record.stale:
            raise _stale(record)
        state = await self._hosts.resolve(record.host)

        try:
            moves = await self._agents.bind(
                state.name,
                state.record.agent_address,
                record.pci_address,
                _identity(record),
                include_group=include_group,
                force=force,
            )
        except IdentityMismatch as err:
            await self._mark_stale(record, err)
            raise
        except PciDeviceNotFound as err:
            raise _not_present(record) from err

        own = next((m for m in moves if m.pci_address == record.pci_address), None)
        self._observe(record.host, moves)
        if own is not None and own.from_driver != VFIO_DRIVER:
            await self._registry.set_binding(
                record.id, bound_by_devpass=True, original_driver=own.from_driver
            )
        log.info("device_bound", name=record.name, pci_address=record.pci_address, host=record.host)
        for move in moves:
            if move.from_driver != VFIO_DRIVER:
                await self._devices.events.emit(
                    "bound",
                    record=record,
                    detail=f"{move.pci_address} from {move.from_driver or 'no driver'}",
                )

        return BindResult(
            await self._current(record), [m.pci_address for m in moves if m.pci_address != record.pci_address]
        )

    async def _restore(self, record: DeviceRecord) -> list[Move]:
        if record.stale:
            raise _stale(record)
        state = await self._hosts.resolve(record.host)

        try:
            moves = await self._agents.restore(
                state.name, state.record.agent_address, record.pci_address, _identity(record)
            )
        except IdentityMismatch as err:
            await self._mark_stale(record, err)
            raise

        self._observe(record.host, moves)
        await self._registry.set_binding(record.id, bound_by_devpass=False, original_driver="")
        log.info(
            "device_unbound",
            name=record.name,
            pci_address=record.pci_address,
            driver=moves[0].driver,
            group_restored=_describe(moves[1:]),
        )
        for move in moves:
            await self._devices.events.emit(
                "unbound", record=record, detail=f"{move.pci_address} to {move.driver or 'no driver'}"
            )

        return moves

    async def reconcile_host(self, host: str) -> None:
        """Reapply the registry's desired state on a host whose agent came back or restarted.

        Devices that devpass bound and that are on another driver now (after a reboot or an
        agent restart) are bound again, with the identity check of every bind. Devices on
        vfio-pci that devpass did not bind are reported, not changed.
        """
        if host in self._reconciling:
            return
        self._reconciling.add(host)
        try:
            await self._reconcile(host)
        except DevpassError as err:
            log.warning("host_reconcile_failed", host=host, reason=err.reason, error=err.message)
        finally:
            self._reconciling.discard(host)

    async def _reconcile(self, host: str) -> None:
        state = self._hosts.get(host)
        if state is None:
            return
        rebound = 0
        for record in await self._devices.records_of(host):
            live = state.functions.get(record.pci_address)
            if record.stale or live is None:
                continue
            if record.bound_by_devpass and not live.bound_to_vfio:
                try:
                    await self._bind_record(record, include_group=False, force=False)
                    rebound += 1
                except DevpassError as err:
                    log.warning(
                        "device_reconcile_failed",
                        host=host,
                        name=record.name,
                        reason=err.reason,
                        error=err.message,
                        check="bind the device again by hand once the cause is fixed",
                    )
            elif not record.bound_by_devpass and live.bound_by_devpass:
                # The agent bound it but died before responding, so the bind is adopted here.
                await self._registry.set_binding(
                    record.id, bound_by_devpass=True, original_driver=live.original_driver
                )
                log.info(
                    "device_binding_adopted",
                    host=host,
                    name=record.name,
                    original_driver=live.original_driver,
                )
                await self._devices.events.emit(
                    "bound", record=record, detail="adopted from the agent's journal"
                )
            elif not record.bound_by_devpass and live.bound_to_vfio:
                log.warning(
                    "device_bound_outside_devpass",
                    host=host,
                    name=record.name,
                    pci_address=record.pci_address,
                    check="something other than devpass moved it to vfio-pci; devpass leaves it as it is",
                )
        log.info("host_reconciled", host=host, rebound=rebound)

    def _devpass_bound(self, record: DeviceRecord) -> bool:
        """Return whether devpass bound the device to vfio-pci, by the registry or the agent's journal."""
        if record.bound_by_devpass:
            return True
        state = self._hosts.get(record.host)
        live = state.functions.get(record.pci_address) if state is not None else None

        return live is not None and live.bound_by_devpass

    async def _mark_stale(self, record: DeviceRecord, err: IdentityMismatch) -> None:
        await self._registry.mark_stale(record.id)
        log.warning("device_marked_stale", name=record.name, pci_address=record.pci_address, host=record.host)
        await self._devices.events.emit("stale", record=record, detail=err.message)

    async def _require_present(self, record: DeviceRecord) -> None:
        """Raise DeviceNotPresent when the host no longer has the device.

        The last heartbeat decides when it lists the device; otherwise the agent is asked,
        because a device can appear (a new VF) between two heartbeats.
        """
        if self._devices.view(record).present:
            return

        state = await self._hosts.resolve(record.host)
        try:
            function = await self._agents.inspect(state.name, state.record.agent_address, record.pci_address)
        except PciDeviceNotFound as err:
            raise _not_present(record) from err
        self._hosts.observe(
            record.host, record.pci_address, FunctionState(function.driver, function.bound_to_vfio)
        )

    def _observe(self, host: str, moves: list[Move]) -> None:
        """Record the agent's fresh driver state, so reads show it before the next heartbeat."""
        for move in moves:
            self._hosts.observe(
                host, move.pci_address, FunctionState(move.driver, move.driver == VFIO_DRIVER)
            )

    async def _current(self, record: DeviceRecord) -> DeviceView:
        fresh = await self._registry.find_device(record.id)

        return self._devices.view(fresh or record)


def _describe(moves: list[Move]) -> list[str]:
    return [f"{move.pci_address} {move.driver or 'no driver'}" for move in moves]


def _identity(record: DeviceRecord) -> Identity:
    return Identity(
        record.vendor_id,
        record.device_id,
        record.subsystem_vendor_id,
        record.subsystem_device_id,
        record.serial_number,
    )


def _not_present(record: DeviceRecord) -> DeviceNotPresent:
    return DeviceNotPresent(
        f"{record.pci_address} is no longer present on host {record.host} (removed or hot-unplugged); "
        "unregister the entry, or bring the device back with a PCI rescan",
        pci_address=record.pci_address,
        host=record.host,
    )


def _stale(record: DeviceRecord) -> IdentityMismatch:
    return IdentityMismatch(
        f"device {record.name!r} is stale: {record.pci_address} on {record.host} held other hardware "
        "at the last check, so devpass writes nothing there. Unregister the entry and register the "
        "device again",
        pci_address=record.pci_address,
        host=record.host,
    )
