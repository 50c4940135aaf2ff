import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from devpass.v1 import pci_pb2 as _pci_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Host(_message.Message):
    __slots__ = ("name", "agent_address", "agent_version", "iommu_enabled", "vfio_available", "simulated", "available", "last_heartbeat", "heartbeat_age_seconds", "pci_function_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    IOMMU_ENABLED_FIELD_NUMBER: _ClassVar[int]
    VFIO_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PCI_FUNCTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    agent_address: str
    agent_version: str
    iommu_enabled: bool
    vfio_available: bool
    simulated: bool
    available: bool
    last_heartbeat: _timestamp_pb2.Timestamp
    heartbeat_age_seconds: float
    pci_function_count: int
    def __init__(self, name: _Optional[str] = ..., agent_address: _Optional[str] = ..., agent_version: _Optional[str] = ..., iommu_enabled: _Optional[bool] = ..., vfio_available: _Optional[bool] = ..., simulated: _Optional[bool] = ..., available: _Optional[bool] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_age_seconds: _Optional[float] = ..., pci_function_count: _Optional[int] = ...) -> None: ...

class ListHostsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHostsResponse(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[Host]
    def __init__(self, hosts: _Optional[_Iterable[_Union[Host, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("host", "agent_address", "agent_version", "iommu_enabled", "vfio_available", "simulated", "functions", "agent_instance")
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    IOMMU_ENABLED_FIELD_NUMBER: _ClassVar[int]
    VFIO_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    host: str
    agent_address: str
    agent_version: str
    iommu_enabled: bool
    vfio_available: bool
    simulated: bool
    functions: _containers.RepeatedCompositeFieldContainer[_pci_pb2.PciFunction]
    agent_instance: str
    def __init__(self, host: _Optional[str] = ..., agent_address: _Optional[str] = ..., agent_version: _Optional[str] = ..., iommu_enabled: _Optional[bool] = ..., vfio_available: _Optional[bool] = ..., simulated: _Optional[bool] = ..., functions: _Optional[_Iterable[_Union[_pci_pb2.PciFunction, _Mapping]]] = ..., agent_instance: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("interval_seconds",)
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    interval_seconds: float
    def __init__(self, interval_seconds: _Optional[float] = ...) -> None: ...
