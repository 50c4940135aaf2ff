"""The AgentService servicer: the controller's window onto one host's PCI functions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from agent import safety
from agent.sysfs import Identity, PciFunctionInfo, Sysfs
from agent.usage import HostUsage
from agent.vfio import Binder, Move
from devpass.pci import PciAddress
from devpass.v1 import agent_pb2, agent_pb2_grpc, pci_pb2


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Serve the host's PCI functions to the controller; sysfs work runs in worker threads."""

    def __init__(self, sysfs: Sysfs, usage: HostUsage, binder: Binder) -> None:
        self._sysfs = sysfs
        self._usage = usage
        self._binder = binder
        # Called after every driver change, so the controller hears of it before the next heartbeat.
        self.on_change: Callable[[], None] = lambda: None

    async def InspectFunction(
        self, request: agent_pb2.InspectFunctionRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.InspectFunctionResponse:
        address = PciAddress.parse(request.pci_address)

        return await asyncio.to_thread(self._inspect, address)

    async def ListFunctions(
        self, request: agent_pb2.ListFunctionsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ListFunctionsResponse:
        return await asyncio.to_thread(self._list)

    async def BindFunction(
        self, request: agent_pb2.BindFunctionRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.BindFunctionResponse:
        address = PciAddress.parse(request.pci_address)
        expected = _identity(request.expected) if request.HasField("expected") else None

        def bind() -> agent_pb2.BindFunctionResponse:
            moves = self._binder.bind(
                address, expected=expected, include_group=request.include_group, force=request.force
            )
            return agent_pb2.BindFunctionResponse(
                moves=[_move_to_proto(m) for m in moves],
                function=function_to_proto(self._sysfs.read_function(address)),
            )

        try:
            return await asyncio.to_thread(bind)
        finally:
            self.on_change()

    async def RestoreFunction(
        self, request: agent_pb2.RestoreFunctionRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RestoreFunctionResponse:
        address = PciAddress.parse(request.pci_address)
        expected = _identity(request.expected) if request.HasField("expected") else None

        def restore() -> agent_pb2.RestoreFunctionResponse:
            moves = self._binder.restore_group(address, expected=expected)
            return agent_pb2.RestoreFunctionResponse(
                move=_move_to_proto(moves[0]),
                group_restored=[_move_to_proto(m) for m in moves[1:]],
                function=function_to_proto(self._sysfs.read_function(address)),
            )

        try:
            return await asyncio.to_thread(restore)
        finally:
            self.on_change()

    def _inspect(self, address: PciAddress) -> agent_pb2.InspectFunctionResponse:
        return self._describe(self._sysfs.read_function(address))

    def _list(self) -> agent_pb2.ListFunctionsResponse:
        return agent_pb2.ListFunctionsResponse(
            functions=[self._describe(f) for f in self._sysfs.list_functions()],
            iommu_enabled=self._sysfs.iommu_enabled(),
            vfio_available=self._sysfs.vfio_available(),
        )

    def _describe(self, function: PciFunctionInfo) -> agent_pb2.InspectFunctionResponse:
        blockers = safety.blockers(self._sysfs, self._usage, function)

        return agent_pb2.InspectFunctionResponse(
            function=function_to_proto(function),
            assignability=pci_pb2.Assignability(
                assignable=not blockers,
                blockers=[
                    pci_pb2.Blocker(
                        reason=b.reason,
                        message=b.message,
                        pci_addresses=[str(a) for a in b.pci_addresses],
                    )
                    for b in blockers
                ],
            ),
            serial_number=function.serial_number,
        )


def function_to_proto(function: PciFunctionInfo) -> pci_pb2.PciFunction:
    """Convert a sysfs reading to its wire form."""
    message = pci_pb2.PciFunction(
        pci_address=str(function.address),
        vendor_id=function.vendor_id,
        device_id=function.device_id,
        subsystem_vendor_id=function.subsystem_vendor_id,
        subsystem_device_id=function.subsystem_device_id,
        class_code=f"{function.class_code:06x}",
        revision=function.revision,
        driver=function.driver or "",
        driver_override=function.driver_override or "",
        numa_node=function.numa_node,
        vendor_name=function.vendor_name,
        device_name=function.device_name,
        physfn=str(function.physfn) if function.physfn else "",
        virtfns=[str(v) for v in function.virtfns],
        boot_vga=function.boot_vga,
        type=function.type,
        bound_to_vfio=function.bound_to_vfio,
    )
    if function.iommu_group is not None:
        message.iommu_group = function.iommu_group

    return message


def _identity(message: agent_pb2.FunctionIdentity) -> Identity:
    return Identity(
        vendor_id=message.vendor_id,
        device_id=message.device_id,
        subsystem_vendor_id=message.subsystem_vendor_id,
        subsystem_device_id=message.subsystem_device_id,
        serial_number=message.serial_number,
    )


def _move_to_proto(move: Move) -> agent_pb2.FunctionMove:
    return agent_pb2.FunctionMove(
        pci_address=str(move.address), from_driver=move.from_driver or "", driver=move.driver or ""
    )
