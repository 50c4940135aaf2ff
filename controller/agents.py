"""The controller's client for agents; agent failures map to domain errors here and only here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from devpass import errors, rpc
from devpass.v1 import agent_pb2, agent_pb2_grpc

T = TypeVar("T")

# Every call that crosses to a host has a deadline, so a stuck agent cannot stall a caller.
DEFAULT_DEADLINE_SECONDS = 10.0
# Binds and restores make several sysfs writes, each with the agent's own write timeout
# (5 s by default), and may roll back. So they get a longer deadline than reads.
WRITE_DEADLINE_SECONDS = 60.0


@dataclass(frozen=True)
class Identity:
    """The hardware identity the registry recorded; agents write nothing where it changed."""

    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    serial_number: str


@dataclass(frozen=True)
class Move:
    """One function's driver change as an agent reported it; empty strings mean no driver."""

    pci_address: str
    from_driver: str
    driver: str


@dataclass(frozen=True)
class Blocker:
    reason: str
    message: str
    pci_addresses: tuple[str, ...]


@dataclass(frozen=True)
class FunctionReport:
    """One PCI function as an agent reported it, with what blocks its passthrough."""

    pci_address: str
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_code: str
    revision: str
    iommu_group: int | None
    driver: str
    driver_override: str
    numa_node: int
    vendor_name: str
    device_name: str
    physfn: str
    virtfns: tuple[str, ...]
    boot_vga: bool
    type: str
    bound_to_vfio: bool
    serial_number: str
    blockers: tuple[Blocker, ...]

    @property
    def assignable(self) -> bool:
        return not self.blockers


@dataclass(frozen=True)
class HostInventory:
    iommu_enabled: bool
    vfio_available: bool
    functions: tuple[FunctionReport, ...]


class AgentClients:
    """One channel per agent address, reused across calls; owned by the controller."""

    def __init__(
        self,
        deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
        write_deadline_seconds: float = WRITE_DEADLINE_SECONDS,
    ) -> None:
        self._deadline = deadline_seconds
        self._write_deadline = write_deadline_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def inspect(self, host: str, address: str, pci_address: str) -> FunctionReport:
        """Read one function on `host`.

        Raises:
            PciDeviceNotFound: the host has no function at the address.
            HostUnavailable: the agent did not respond in time.
        """
        request = agent_pb2.InspectFunctionRequest(pci_address=pci_address)
        response = await self._call(host, address, lambda stub: stub.InspectFunction)(request)

        return _report(response)

    async def list_functions(self, host: str, address: str) -> HostInventory:
        """Read every function on `host`.

        Raises:
            HostUnavailable: the agent did not respond in time.
        """
        request = agent_pb2.ListFunctionsRequest()
        response = await self._call(host, address, lambda stub: stub.ListFunctions)(request)

        return HostInventory(
            iommu_enabled=response.iommu_enabled,
            vfio_available=response.vfio_available,
            functions=tuple(_report(f) for f in response.functions),
        )

    async def bind(
        self,
        host: str,
        address: str,
        pci_address: str,
        expected: Identity,
        *,
        include_group: bool,
        force: bool,
    ) -> list[Move]:
        """Move the function (and with `include_group` its group) to vfio-pci.

        Raises:
            IdentityMismatch, VfioUnavailable, IommuUnavailable, IommuGroupNotViable,
            HostCriticalDevice, DeviceBusy, SriovPfHasVfs, WritePending: nothing was written.
            WriteTimedOut, BindFailed: the error's metadata contains the device state.
            HostUnavailable: the agent did not respond in time.
        """
        request = agent_pb2.BindFunctionRequest(
            pci_address=pci_address, expected=_identity(expected), include_group=include_group, force=force
        )
        response = await self._call(host, address, lambda stub: stub.BindFunction, write=True)(request)

        return [Move(m.pci_address, m.from_driver, m.driver) for m in response.moves]

    async def restore(self, host: str, address: str, pci_address: str, expected: Identity) -> list[Move]:
        """Give the function back to its original driver.

        Raises:
            IdentityMismatch, WritePending, WriteTimedOut, BindFailed, HostUnavailable.
        """
        request = agent_pb2.RestoreFunctionRequest(pci_address=pci_address, expected=_identity(expected))
        response = await self._call(host, address, lambda stub: stub.RestoreFunction, write=True)(request)
        moves = [response.move, *response.group_restored]

        return [Move(str(m.pci_address), str(m.from_driver), str(m.driver)) for m in moves]

    def _call(
        self,
        host: str,
        address: str,
        method: Callable[[agent_pb2_grpc.AgentServiceStub], Callable[..., Awaitable[T]]],
        *,
        write: bool = False,
    ) -> Callable[[object], Awaitable[T]]:
        stub = agent_pb2_grpc.AgentServiceStub(self._channel(address))
        bound = method(stub)
        deadline = self._write_deadline if write else self._deadline

        async def invoke(request: object) -> T:
            metadata = ((rpc.REQUEST_ID_HEADER, rpc.current_request_id.get()),)
            try:
                return await bound(request, timeout=deadline, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                raise _translate(host, address, err) from err

        return invoke

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=rpc.RECONNECT_OPTIONS)
            self._channels[address] = channel

        return channel


def _translate(host: str, address: str, err: grpc.aio.AioRpcError) -> errors.DevpassError:
    """Map an agent's failure to the error the controller reports."""
    domain_error = errors.from_rpc_error(err)
    if domain_error is not None:
        domain_error.metadata.setdefault("host", host)
        if not domain_error.message.startswith(f"host {host}"):
            domain_error.message = f"host {host}: {domain_error.message}"
        return domain_error

    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.HostUnavailable(
            f"the agent of host {host} at {address} did not answer ({err.code().name}: "
            f"{err.details()}); check that devpass-agent runs there and can be reached",
            host=host,
            agent_address=address,
        )

    return errors.DevpassError(
        f"the agent of host {host} failed: {err.code().name}: {err.details()}", host=host
    )


def _identity(identity: Identity) -> agent_pb2.FunctionIdentity:
    return agent_pb2.FunctionIdentity(
        vendor_id=identity.vendor_id,
        device_id=identity.device_id,
        subsystem_vendor_id=identity.subsystem_vendor_id,
        subsystem_device_id=identity.subsystem_device_id,
        serial_number=identity.serial_number,
    )


def _report(response: agent_pb2.InspectFunctionResponse) -> FunctionReport:
    function = response.function

    return FunctionReport(
        pci_address=function.pci_address,
        vendor_id=function.vendor_id,
        device_id=function.device_id,
        subsystem_vendor_id=function.subsystem_vendor_id,
        subsystem_device_id=function.subsystem_device_id,
        class_code=function.class_code,
        revision=function.revision,
        iommu_group=function.iommu_group if function.HasField("iommu_group") else None,
        driver=function.driver,
        driver_override=function.driver_override,
        numa_node=function.numa_node,
        vendor_name=function.vendor_name,
        device_name=function.device_name,
        physfn=function.physfn,
        virtfns=tuple(function.virtfns),
        boot_vga=function.boot_vga,
        type=function.type,
        bound_to_vfio=function.bound_to_vfio,
        serial_number=response.serial_number,
        blockers=tuple(
            Blocker(b.reason, b.message, tuple(b.pci_addresses)) for b in response.assignability.blockers
        ),
    )
