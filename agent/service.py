"""The AgentService servicer: the controller's window onto one host's PCI functions."""

from __future__ import annotations

import asyncio

import grpc

from agent import safety
from agent.sysfs import PciFunctionInfo, Sysfs
from devpass.pci import PciAddress
from devpass.v1 import agent_pb2, agent_pb2_grpc, pci_pb2


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Serve reads of the host's PCI functions; sysfs reads run in worker threads."""

    def __init__(self, sysfs: Sysfs) -> None:
        self._sysfs = sysfs

    async def InspectFunction(
        self, request: agent_pb2.InspectFunctionRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.InspectFunctionResponse:
        address = PciAddress.parse(request.pci_address)

        return await asyncio.to_thread(self._inspect, address)

    async def ListFunctions(
        self, request: agent_pb2.ListFunctionsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ListFunctionsResponse:
        return await asyncio.to_thread(self._list)

    def _inspect(self, address: PciAddress) -> agent_pb2.InspectFunctionResponse:
        return self._describe(self._sysfs.read_function(address))

    def _list(self) -> agent_pb2.ListFunctionsResponse:
        return agent_pb2.ListFunctionsResponse(
            functions=[self._describe(f) for f in self._sysfs.list_functions()],
            iommu_enabled=self._sysfs.iommu_enabled(),
            vfio_available=self._sysfs.vfio_available(),
        )

    def _describe(self, function: PciFunctionInfo) -> agent_pb2.InspectFunctionResponse:
        blockers = safety.blockers(self._sysfs, function)

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
