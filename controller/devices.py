"""Device registration and lookup: the controller's domain logic, free of protobuf."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog
from cuid2 import create_id

from controller.agents import AgentClients, FunctionReport
from controller.events import EventLog
from controller.hosts import FunctionState, HostDirectory, HostState
from controller.registry import DeviceRecord, Registry, already_registered
from devpass.errors import (
    DeviceNotFound,
    DevpassError,
    HostUnavailable,
    InvalidArgument,
    InvalidPageToken,
    NameTaken,
    bridge_not_assignable,
    iommu_unavailable,
)
from devpass.names import auto_name, host_qualified_name, validate_name
from devpass.pci import PciAddress, is_bridge

log = structlog.get_logger()

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
DEVICE_TYPES = ("gpu", "pci")


@dataclass(frozen=True)
class DeviceView:
    """A registry entry joined with its host's last reported live state."""

    record: DeviceRecord
    driver: str
    bound_to_vfio: bool
    present: bool
    host_available: bool
    simulated: bool
    observed_at: datetime | None


@dataclass(frozen=True)
class Candidate:
    """A PCI function that a host offers, with its registry name when it has one."""

    host: str
    function: FunctionReport
    registered_name: str
    simulated: bool


@dataclass(frozen=True)
class HostFailure:
    host: str
    error: DevpassError


class Devices:
    """Register, look up and unregister devices; the registry owns names, agents own hardware."""

    def __init__(
        self, registry: Registry, hosts: HostDirectory, agents: AgentClients, events: EventLog
    ) -> None:
        self._registry = registry
        self._hosts = hosts
        self._agents = agents
        self.events = events

    async def register(self, host: str, pci_address: str, name: str, request_id: str = "") -> DeviceView:
        """Register the function at `pci_address` on `host` under `name`, or a generated name.

        A retry whose `request_id` created the existing entry returns that entry, so a call
        whose response was lost (the controller died before sending it) converges on retry.

        Raises:
            InvalidPciAddress, InvalidName: malformed input; nothing is read.
            HostUnknown, HostRequired, HostUnavailable: the host cannot be used.
            DeviceAlreadyRegistered: the address on that host has an entry.
            PciDeviceNotFound: the host has no function at the address.
            IommuUnavailable: the host runs without an IOMMU.
            NameTaken: the name belongs to another device.
        """
        address = PciAddress.parse(pci_address)
        if name:
            validate_name(name)
        state = await self._hosts.resolve(host)

        existing = await self._registry.device_at(state.name, str(address))
        if existing is not None and request_id and existing.request_id == request_id:
            return self.view(existing)
        if existing is not None:
            raise already_registered(existing)

        function = await self._agents.inspect(state.name, state.record.agent_address, str(address))
        if is_bridge(int(function.class_code, 16)):
            raise bridge_not_assignable(str(address), host=state.name)
        if function.iommu_group is None:
            raise iommu_unavailable(str(address), host=state.name)

        record = await self._insert(state, address, function, name, request_id)
        self._hosts.observe(
            state.name, record.pci_address, FunctionState(function.driver, function.bound_to_vfio)
        )
        log.info(
            "device_registered",
            host=record.host,
            pci_address=record.pci_address,
            name=record.name,
            device_id=record.id,
        )
        await self.events.emit("registered", record=record)

        return self.view(record)

    async def _insert(
        self, state: HostState, address: PciAddress, function: FunctionReport, name: str, request_id: str
    ) -> DeviceRecord:
        record = _new_record(state.name, address, function, name or auto_name(address), request_id)
        if name:
            return await self._registry.add_device(record)

        try:
            return await self._registry.add_device(record)
        except NameTaken:
            # Another device owns the plain generated name, most often the same address on
            # another host, so this one is qualified by its host.
            qualified = host_qualified_name(address, state.name)
            return await self._registry.add_device(replace(record, name=qualified))

    async def get(self, id_or_name: str) -> DeviceView:
        """Return the device with this id or name.

        Raises:
            DeviceNotFound: no device has that id or name.
        """
        return self.view(await self.find_record(id_or_name))

    async def list_devices(
        self, *, host: str, type: str, page_size: int, page_token: str
    ) -> tuple[list[DeviceView], str]:
        """Return one page of devices in registration order and the token of the next page.

        Raises:
            InvalidArgument: unknown type or a negative page size.
            InvalidPageToken: the token is malformed or was issued for other filters.
        """
        if type and type not in DEVICE_TYPES:
            raise InvalidArgument(
                f"invalid type filter {type!r}: use one of {', '.join(DEVICE_TYPES)}, or none",
                type=type,
            )
        if page_size < 0:
            raise InvalidArgument(
                f"invalid page_size {page_size}: use 0 for the default or a positive number"
            )

        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token, host=host, type=type)
        records = await self._registry.list_devices(host=host, type=type, after_seq=after, limit=limit + 1)
        page = records[:limit]
        next_token = _encode_page_token(page[-1].seq, host=host, type=type) if len(records) > limit else ""

        return [self.view(r) for r in page], next_token

    async def remove(self, record: DeviceRecord) -> DeviceView:
        """Delete the registry entry and return the device as it was.

        Raises:
            DeviceNotFound: another call removed it first.
        """
        view = self.view(record)
        if not await self._registry.remove_device(record.id):
            raise _device_not_found(record.id)
        log.info("device_unregistered", host=record.host, pci_address=record.pci_address, name=record.name)
        await self.events.emit("removed", record=record)

        return view

    async def available(self, host: str) -> tuple[list[Candidate], list[HostFailure]]:
        """List the functions that `host`, or every available host, could pass through.

        Bridges are left out because they never go to a virtual machine.

        Raises:
            HostUnknown, HostUnavailable: a named host cannot be asked.
        """
        if host:
            targets = [await self._hosts.resolve(host)]
            failures: list[HostFailure] = []
        else:
            await self._hosts.refresh()
            targets = [s for s in self._hosts.hosts() if self._hosts.is_available(s)]
            failures = [
                HostFailure(s.name, _unavailable(s.name))
                for s in self._hosts.hosts()
                if not self._hosts.is_available(s)
            ]

        results = await asyncio.gather(
            *(self._candidates(state) for state in targets), return_exceptions=True
        )
        candidates: list[Candidate] = []
        for state, result in zip(targets, results, strict=True):
            if isinstance(result, DevpassError):
                failures.append(HostFailure(state.name, result))
            elif isinstance(result, BaseException):
                raise result
            else:
                candidates.extend(result)

        return candidates, failures

    async def _candidates(self, state: HostState) -> list[Candidate]:
        inventory = await self._agents.list_functions(state.name, state.record.agent_address)
        names = await self._registered_names(state.name)

        return [
            Candidate(state.name, function, names.get(function.pci_address, ""), state.record.simulated)
            for function in inventory.functions
            if not is_bridge(int(function.class_code, 16))
        ]

    async def _registered_names(self, host: str) -> dict[str, str]:
        return {r.pci_address: r.name for r in await self.records_of(host)}

    async def records_of(self, host: str) -> list[DeviceRecord]:
        """Return every registered device of `host`, in registration order."""
        found: list[DeviceRecord] = []
        while True:
            after = found[-1].seq if found else 0
            records = await self._registry.list_devices(
                host=host, type="", after_seq=after, limit=MAX_PAGE_SIZE
            )
            found.extend(records)
            if len(records) < MAX_PAGE_SIZE:
                return found

    async def find_record(self, id_or_name: str) -> DeviceRecord:
        if not id_or_name:
            raise InvalidArgument("id_or_name is empty: give a device id or name")
        record = await self._registry.find_device(id_or_name)
        if record is None:
            raise _device_not_found(id_or_name)

        return record

    def view(self, record: DeviceRecord) -> DeviceView:
        state = self._hosts.get(record.host)
        live = state.functions.get(record.pci_address) if state is not None else None
        # A host whose functions were never reported (no heartbeat yet) has unknown
        # presence, which reads as present rather than as removed.
        seen = state is not None and (state.last_seen is not None or bool(state.functions))

        return DeviceView(
            record=record,
            driver=live.driver if live is not None else "",
            bound_to_vfio=live.bound_to_vfio if live is not None else False,
            present=live is not None or not seen,
            host_available=state is not None and self._hosts.is_available(state),
            simulated=state is not None and state.record.simulated,
            observed_at=state.record.last_heartbeat if seen and state is not None else None,
        )


def _new_record(
    host: str, address: PciAddress, function: FunctionReport, name: str, request_id: str
) -> DeviceRecord:
    return DeviceRecord(
        id=create_id(),
        name=name,
        host=host,
        pci_address=str(address),
        type=function.type,
        vendor_id=function.vendor_id,
        device_id=function.device_id,
        subsystem_vendor_id=function.subsystem_vendor_id,
        subsystem_device_id=function.subsystem_device_id,
        class_code=function.class_code,
        serial_number=function.serial_number,
        vendor_name=function.vendor_name,
        device_name=function.device_name,
        iommu_group=function.iommu_group,
        numa_node=function.numa_node,
        created_at=datetime.now(UTC),
        request_id=request_id,
    )


def _device_not_found(id_or_name: str) -> DeviceNotFound:
    return DeviceNotFound(
        f"no registered device has id or name {id_or_name!r}; list them with `devpass devices list`",
        id_or_name=id_or_name[:80],
    )


def _unavailable(host: str) -> HostUnavailable:
    return HostUnavailable(f"host {host} missed its heartbeats and was not asked", host=host)


def _encode_page_token(after: int, *, host: str, type: str) -> str:
    payload = json.dumps({"after": after, "host": host, "type": type}, separators=(",", ":"))

    return base64.urlsafe_b64encode(payload.encode()).decode()


def _decode_page_token(token: str, *, host: str, type: str) -> int:
    if not token:
        return 0
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode()))
        after = int(payload["after"])
        same_filters = payload["host"] == host and payload["type"] == type
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise InvalidPageToken(
            "invalid page_token: pass the next_page_token of the previous response unchanged",
            page_token=token[:80],
        ) from err
    if not same_filters:
        raise InvalidPageToken(
            "page_token was issued for other filters: repeat the host and type filters of the first page",
            page_token=token[:80],
        )

    return after
