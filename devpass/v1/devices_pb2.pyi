import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from devpass.v1 import pci_pb2 as _pci_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Device(_message.Message):
    __slots__ = ("id", "name", "type", "pci_address", "vendor_id", "device_id", "iommu_group", "bound_to_vfio", "attached_to", "created_at", "host", "vendor_name", "device_name", "driver", "numa_node", "subsystem_vendor_id", "subsystem_device_id", "class_code", "present", "stale", "simulated", "state_observed_at", "host_available", "bound_by_devpass", "original_driver")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    IOMMU_GROUP_FIELD_NUMBER: _ClassVar[int]
    BOUND_TO_VFIO_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_TO_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    VENDOR_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    NUMA_NODE_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEM_VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEM_DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_CODE_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    STATE_OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    HOST_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    BOUND_BY_DEVPASS_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_DRIVER_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    type: str
    pci_address: str
    vendor_id: str
    device_id: str
    iommu_group: int
    bound_to_vfio: bool
    attached_to: str
    created_at: _timestamp_pb2.Timestamp
    host: str
    vendor_name: str
    device_name: str
    driver: str
    numa_node: int
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_code: str
    present: bool
    stale: bool
    simulated: bool
    state_observed_at: _timestamp_pb2.Timestamp
    host_available: bool
    bound_by_devpass: bool
    original_driver: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., pci_address: _Optional[str] = ..., vendor_id: _Optional[str] = ..., device_id: _Optional[str] = ..., iommu_group: _Optional[int] = ..., bound_to_vfio: _Optional[bool] = ..., attached_to: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., host: _Optional[str] = ..., vendor_name: _Optional[str] = ..., device_name: _Optional[str] = ..., driver: _Optional[str] = ..., numa_node: _Optional[int] = ..., subsystem_vendor_id: _Optional[str] = ..., subsystem_device_id: _Optional[str] = ..., class_code: _Optional[str] = ..., present: _Optional[bool] = ..., stale: _Optional[bool] = ..., simulated: _Optional[bool] = ..., state_observed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., host_available: _Optional[bool] = ..., bound_by_devpass: _Optional[bool] = ..., original_driver: _Optional[str] = ...) -> None: ...

class RegisterDeviceRequest(_message.Message):
    __slots__ = ("host", "pci_address", "name", "bind_vfio", "include_group", "force", "request_id")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BIND_VFIO_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GROUP_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    host: str
    pci_address: str
    name: str
    bind_vfio: bool
    include_group: bool
    force: bool
    request_id: str
    def __init__(self, host: _Optional[str] = ..., pci_address: _Optional[str] = ..., name: _Optional[str] = ..., bind_vfio: _Optional[bool] = ..., include_group: _Optional[bool] = ..., force: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetDeviceRequest(_message.Message):
    __slots__ = ("id_or_name",)
    ID_OR_NAME_FIELD_NUMBER: _ClassVar[int]
    id_or_name: str
    def __init__(self, id_or_name: _Optional[str] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("host", "type", "page_size", "page_token")
    HOST_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    host: str
    type: str
    page_size: int
    page_token: str
    def __init__(self, host: _Optional[str] = ..., type: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "next_page_token")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    next_page_token: str
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UnregisterDeviceRequest(_message.Message):
    __slots__ = ("id_or_name", "force", "request_id")
    ID_OR_NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id_or_name: str
    force: bool
    request_id: str
    def __init__(self, id_or_name: _Optional[str] = ..., force: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class UnregisterDeviceResponse(_message.Message):
    __slots__ = ("device", "restored_driver", "group_restored")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESTORED_DRIVER_FIELD_NUMBER: _ClassVar[int]
    GROUP_RESTORED_FIELD_NUMBER: _ClassVar[int]
    device: Device
    restored_driver: str
    group_restored: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., restored_driver: _Optional[str] = ..., group_restored: _Optional[_Iterable[str]] = ...) -> None: ...

class BindDeviceRequest(_message.Message):
    __slots__ = ("id_or_name", "include_group", "force", "request_id")
    ID_OR_NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GROUP_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id_or_name: str
    include_group: bool
    force: bool
    request_id: str
    def __init__(self, id_or_name: _Optional[str] = ..., include_group: _Optional[bool] = ..., force: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class BindDeviceResponse(_message.Message):
    __slots__ = ("device", "group_bound")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GROUP_BOUND_FIELD_NUMBER: _ClassVar[int]
    device: Device
    group_bound: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., group_bound: _Optional[_Iterable[str]] = ...) -> None: ...

class UnbindDeviceRequest(_message.Message):
    __slots__ = ("id_or_name", "request_id")
    ID_OR_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id_or_name: str
    request_id: str
    def __init__(self, id_or_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class UnbindDeviceResponse(_message.Message):
    __slots__ = ("device", "restored_driver", "group_restored")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESTORED_DRIVER_FIELD_NUMBER: _ClassVar[int]
    GROUP_RESTORED_FIELD_NUMBER: _ClassVar[int]
    device: Device
    restored_driver: str
    group_restored: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., restored_driver: _Optional[str] = ..., group_restored: _Optional[_Iterable[str]] = ...) -> None: ...

class AttachDeviceRequest(_message.Message):
    __slots__ = ("id_or_name", "instance_id", "include_group", "force", "request_id")
    ID_OR_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GROUP_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id_or_name: str
    instance_id: str
    include_group: bool
    force: bool
    request_id: str
    def __init__(self, id_or_name: _Optional[str] = ..., instance_id: _Optional[str] = ..., include_group: _Optional[bool] = ..., force: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class DetachDeviceRequest(_message.Message):
    __slots__ = ("id_or_name", "request_id")
    ID_OR_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id_or_name: str
    request_id: str
    def __init__(self, id_or_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListAvailableDevicesRequest(_message.Message):
    __slots__ = ("host",)
    HOST_FIELD_NUMBER: _ClassVar[int]
    host: str
    def __init__(self, host: _Optional[str] = ...) -> None: ...

class AvailableDevice(_message.Message):
    __slots__ = ("host", "function", "assignability", "registered_name", "simulated")
    HOST_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNABILITY_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_NAME_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    host: str
    function: _pci_pb2.PciFunction
    assignability: _pci_pb2.Assignability
    registered_name: str
    simulated: bool
    def __init__(self, host: _Optional[str] = ..., function: _Optional[_Union[_pci_pb2.PciFunction, _Mapping]] = ..., assignability: _Optional[_Union[_pci_pb2.Assignability, _Mapping]] = ..., registered_name: _Optional[str] = ..., simulated: _Optional[bool] = ...) -> None: ...

class ListAvailableDevicesResponse(_message.Message):
    __slots__ = ("devices", "unreachable_hosts")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[AvailableDevice]
    unreachable_hosts: _containers.RepeatedCompositeFieldContainer[HostError]
    def __init__(self, devices: _Optional[_Iterable[_Union[AvailableDevice, _Mapping]]] = ..., unreachable_hosts: _Optional[_Iterable[_Union[HostError, _Mapping]]] = ...) -> None: ...

class HostError(_message.Message):
    __slots__ = ("host", "reason", "message")
    HOST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    host: str
    reason: str
    message: str
    def __init__(self, host: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class WatchDevicesRequest(_message.Message):
    __slots__ = ("host", "device", "after_cursor")
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    host: str
    device: str
    after_cursor: int
    def __init__(self, host: _Optional[str] = ..., device: _Optional[str] = ..., after_cursor: _Optional[int] = ...) -> None: ...

class DeviceEvent(_message.Message):
    __slots__ = ("cursor", "kind", "host", "device_id", "name", "pci_address", "detail", "at")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    kind: str
    host: str
    device_id: str
    name: str
    pci_address: str
    detail: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, cursor: _Optional[int] = ..., kind: _Optional[str] = ..., host: _Optional[str] = ..., device_id: _Optional[str] = ..., name: _Optional[str] = ..., pci_address: _Optional[str] = ..., detail: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
