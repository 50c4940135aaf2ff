"""gRPC servicers of the controller: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from controller.agents import FunctionReport
from controller.devices import Candidate, Devices, DeviceView
from controller.events import WatchFilter
from controller.hosts import FunctionState, HostDirectory, HostReport
from controller.passthrough import Passthrough
from controller.registry import HostRecord, Registry, RequestRecord
from devpass.errors import InvalidArgument
from devpass.names import validate_host_name
from devpass.v1 import devices_pb2, devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc, pci_pb2

M = TypeVar("M", bound=Message)
MAX_REQUEST_ID_LENGTH = 128


class RequestLog:
    """Replay the stored response of a mutating call retried with the same request id."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def run(
        self, method: str, request: Any, response_type: type[M], action: Callable[[], Awaitable[M]]
    ) -> M:
        """Return the first response for `request.request_id`, or run `action` and store its response.

        Raises:
            InvalidArgument: the id was used before for another method or another request.
        """
        request_id: str = request.request_id
        if not request_id:
            return await action()
        if len(request_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidArgument(
                f"request_id is {len(request_id)} characters long; use at most {MAX_REQUEST_ID_LENGTH}",
                request_id=request_id[:MAX_REQUEST_ID_LENGTH],
            )

        fingerprint = _fingerprint(request)
        found = await self._registry.find_request(request_id)
        if found is not None:
            if found.method != method or found.fingerprint != fingerprint:
                raise RequestIdReused(
                    f"request_id {request_id!r} was already used for a different {found.method} "
                    "request; use a new request_id for a new request",
                    request_id=request_id,
                )
            replayed: M = response_type.FromString(found.response)
            return replayed

        response = await action()
        await self._registry.save_request(
            RequestRecord(request_id, method, fingerprint, response.SerializeToString(deterministic=True))
        )

        return response


class RequestIdReused(InvalidArgument):
    reason = "REQUEST_ID_REUSED"


def _fingerprint(request: Any) -> str:
    copy = type(request)()
    copy.CopyFrom(request)
    copy.request_id = ""

    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


class DeviceServicer(devices_pb2_grpc.DeviceServiceServicer):
    def __init__(self, devices: Devices, passthrough: Passthrough, requests: RequestLog) -> None:
        self._devices = devices
        self._passthrough = passthrough
        self._requests = requests

    async def RegisterDevice(
        self, request: devices_pb2.RegisterDeviceRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.Device:
        async def register() -> devices_pb2.Device:
            if request.bind_vfio:
                result = await self._passthrough.register_and_bind(
                    request.host,
                    request.pci_address,
                    request.name,
                    include_group=request.include_group,
                    force=request.force,
                    request_id=request.request_id,
                )
                return device_to_proto(result.device)
            view = await self._devices.register(
                request.host, request.pci_address, request.name, request.request_id
            )
            return device_to_proto(view)

        return await self._requests.run("RegisterDevice", request, devices_pb2.Device, register)

    async def BindDevice(
        self, request: devices_pb2.BindDeviceRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.BindDeviceResponse:
        async def bind() -> devices_pb2.BindDeviceResponse:
            result = await self._passthrough.bind(
                request.id_or_name, include_group=request.include_group, force=request.force
            )
            return devices_pb2.BindDeviceResponse(
                device=device_to_proto(result.device), group_bound=result.group_bound
            )

        return await self._requests.run("BindDevice", request, devices_pb2.BindDeviceResponse, bind)

    async def UnbindDevice(
        self, request: devices_pb2.UnbindDeviceRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.UnbindDeviceResponse:
        async def unbind() -> devices_pb2.UnbindDeviceResponse:
            result = await self._passthrough.unbind(request.id_or_name)
            return devices_pb2.UnbindDeviceResponse(
                device=device_to_proto(result.device),
                restored_driver=result.restored_driver,
                group_restored=result.group_restored,
            )

        return await self._requests.run("UnbindDevice", request, devices_pb2.UnbindDeviceResponse, unbind)

    async def AttachDevice(
        self, request: devices_pb2.AttachDeviceRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.Device:
        async def attach() -> devices_pb2.Device:
            view = await self._passthrough.attach(
                request.id_or_name,
                request.instance_id,
                include_group=request.include_group,
                force=request.force,
            )
            return device_to_proto(view)

        return await self._requests.run("AttachDevice", request, devices_pb2.Device, attach)

    async def WatchDevices(
        self, request: devices_pb2.WatchDevicesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[devices_pb2.DeviceEvent]:
        if request.after_cursor < 0:
            raise InvalidArgument(
                f"invalid after_cursor {request.after_cursor}: use 0 or a cursor from an event"
            )
        where = WatchFilter(host=request.host, device=request.device)
        async for event in self._devices.events.watch(request.after_cursor, where):
            message = devices_pb2.DeviceEvent(
                cursor=event.cursor,
                kind=event.kind,
                host=event.host,
                device_id=event.device_id,
                name=event.name,
                pci_address=event.pci_address,
                detail=event.detail,
            )
            if event.at is not None:
                message.at.CopyFrom(_timestamp(event.at))
            yield message

    async def DetachDevice(
        self, request: devices_pb2.DetachDeviceRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.Device:
        async def detach() -> devices_pb2.Device:
            return device_to_proto(await self._passthrough.detach(request.id_or_name))

        return await self._requests.run("DetachDevice", request, devices_pb2.Device, detach)

    async def GetDevice(
        self, request: devices_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.Device:
        return device_to_proto(await self._devices.get(request.id_or_name))

    async def ListDevices(
        self, request: devices_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.ListDevicesResponse:
        views, next_token = await self._devices.list_devices(
            host=request.host,
            type=request.type,
            page_size=request.page_size,
            page_token=request.page_token,
        )

        return devices_pb2.ListDevicesResponse(
            devices=[device_to_proto(v) for v in views], next_page_token=next_token
        )

    async def UnregisterDevice(
        self, request: devices_pb2.UnregisterDeviceRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.UnregisterDeviceResponse:
        async def unregister() -> devices_pb2.UnregisterDeviceResponse:
            result = await self._passthrough.unregister(request.id_or_name, force=request.force)
            return devices_pb2.UnregisterDeviceResponse(
                device=device_to_proto(result.device),
                restored_driver=result.restored_driver,
                group_restored=result.group_restored,
            )

        return await self._requests.run(
            "UnregisterDevice", request, devices_pb2.UnregisterDeviceResponse, unregister
        )

    async def ListAvailableDevices(
        self, request: devices_pb2.ListAvailableDevicesRequest, context: grpc.aio.ServicerContext
    ) -> devices_pb2.ListAvailableDevicesResponse:
        candidates, failures = await self._devices.available(request.host)

        return devices_pb2.ListAvailableDevicesResponse(
            devices=[_candidate_to_proto(c) for c in candidates],
            unreachable_hosts=[
                devices_pb2.HostError(host=f.host, reason=f.error.reason, message=f.error.message)
                for f in failures
            ],
        )


class HostServicer(hosts_pb2_grpc.HostServiceServicer):
    def __init__(self, hosts: HostDirectory) -> None:
        self._hosts = hosts

    async def Heartbeat(
        self, request: hosts_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> hosts_pb2.HeartbeatResponse:
        validate_host_name(request.host)
        record = HostRecord(
            name=request.host,
            agent_address=request.agent_address,
            agent_version=request.agent_version,
            iommu_enabled=request.iommu_enabled,
            vfio_available=request.vfio_available,
            simulated=request.simulated,
            last_heartbeat=datetime.now(UTC),
        )
        functions = {
            f.pci_address: FunctionState(
                driver=f.driver,
                bound_to_vfio=f.bound_to_vfio,
                bound_by_devpass=f.bound_by_devpass,
                original_driver=f.original_driver,
            )
            for f in request.functions
        }
        await self._hosts.heartbeat(HostReport(record, functions, request.agent_instance))

        return hosts_pb2.HeartbeatResponse(interval_seconds=self._hosts.interval)

    async def ListHosts(
        self, request: hosts_pb2.ListHostsRequest, context: grpc.aio.ServicerContext
    ) -> hosts_pb2.ListHostsResponse:
        await self._hosts.refresh()
        hosts = []
        for state in self._hosts.hosts():
            record = state.record
            hosts.append(
                hosts_pb2.Host(
                    name=record.name,
                    agent_address=record.agent_address,
                    agent_version=record.agent_version,
                    iommu_enabled=record.iommu_enabled,
                    vfio_available=record.vfio_available,
                    simulated=record.simulated,
                    available=self._hosts.is_available(state),
                    last_heartbeat=_timestamp(record.last_heartbeat),
                    heartbeat_age_seconds=round(self._hosts.heartbeat_age(state), 3),
                    pci_function_count=len(state.functions),
                )
            )

        return hosts_pb2.ListHostsResponse(hosts=hosts)


def device_to_proto(view: DeviceView) -> devices_pb2.Device:
    record = view.record
    message = devices_pb2.Device(
        id=record.id,
        name=record.name,
        type=record.type,
        pci_address=record.pci_address,
        vendor_id=record.vendor_id,
        device_id=record.device_id,
        bound_to_vfio=view.bound_to_vfio,
        attached_to=record.attached_to,
        created_at=_timestamp(record.created_at),
        host=record.host,
        vendor_name=record.vendor_name,
        device_name=record.device_name,
        driver=view.driver,
        numa_node=record.numa_node,
        subsystem_vendor_id=record.subsystem_vendor_id,
        subsystem_device_id=record.subsystem_device_id,
        class_code=record.class_code,
        present=view.present,
        stale=record.stale,
        simulated=view.simulated,
        host_available=view.host_available,
        bound_by_devpass=record.bound_by_devpass,
        original_driver=record.original_driver,
    )
    if record.iommu_group is not None:
        message.iommu_group = record.iommu_group
    if view.observed_at is not None:
        message.state_observed_at.CopyFrom(_timestamp(view.observed_at))

    return message


def function_to_proto(function: FunctionReport) -> pci_pb2.PciFunction:
    message = pci_pb2.PciFunction(
        pci_address=function.pci_address,
        vendor_id=function.vendor_id,
        device_id=function.device_id,
        subsystem_vendor_id=function.subsystem_vendor_id,
        subsystem_device_id=function.subsystem_device_id,
        class_code=function.class_code,
        revision=function.revision,
        driver=function.driver,
        driver_override=function.driver_override,
        numa_node=function.numa_node,
        vendor_name=function.vendor_name,
        device_name=function.device_name,
        physfn=function.physfn,
        virtfns=list(function.virtfns),
        boot_vga=function.boot_vga,
        type=function.type,
        bound_to_vfio=function.bound_to_vfio,
    )
    if function.iommu_group is not None:
        message.iommu_group = function.iommu_group

    return message


def _candidate_to_proto(candidate: Candidate) -> devices_pb2.AvailableDevice:
    blockers = candidate.function.blockers

    return devices_pb2.AvailableDevice(
        host=candidate.host,
        function=function_to_proto(candidate.function),
        assignability=pci_pb2.Assignability(
            assignable=not blockers,
            blockers=[
                pci_pb2.Blocker(reason=b.reason, message=b.message, pci_addresses=list(b.pci_addresses))
                for b in blockers
            ],
        ),
        registered_name=candidate.registered_name,
        simulated=candidate.simulated,
    )


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)

    return stamp
