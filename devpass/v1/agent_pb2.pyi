from devpass.v1 import pci_pb2 as _pci_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FunctionIdentity(_message.Message):
    __slots__ = ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id", "serial_number")
    VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEM_VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEM_DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    serial_number: str
    def __init__(self, vendor_id: _Optional[str] = ..., device_id: _Optional[str] = ..., subsystem_vendor_id: _Optional[str] = ..., subsystem_device_id: _Optional[str] = ..., serial_number: _Optional[str] = ...) -> None: ...

class FunctionMove(_message.Message):
    __slots__ = ("pci_address", "from_driver", "driver")
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FROM_DRIVER_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    pci_address: str
    from_driver: str
    driver: str
    def __init__(self, pci_address: _Optional[str] = ..., from_driver: _Optional[str] = ..., driver: _Optional[str] = ...) -> None: ...

class BindFunctionRequest(_message.Message):
    __slots__ = ("pci_address", "expected", "include_group", "force")
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GROUP_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    pci_address: str
    expected: FunctionIdentity
    include_group: bool
    force: bool
    def __init__(self, pci_address: _Optional[str] = ..., expected: _Optional[_Union[FunctionIdentity, _Mapping]] = ..., include_group: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class BindFunctionResponse(_message.Message):
    __slots__ = ("moves", "function")
    MOVES_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    moves: _containers.RepeatedCompositeFieldContainer[FunctionMove]
    function: _pci_pb2.PciFunction
    def __init__(self, moves: _Optional[_Iterable[_Union[FunctionMove, _Mapping]]] = ..., function: _Optional[_Union[_pci_pb2.PciFunction, _Mapping]] = ...) -> None: ...

class RestoreFunctionRequest(_message.Message):
    __slots__ = ("pci_address", "expected")
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    pci_address: str
    expected: FunctionIdentity
    def __init__(self, pci_address: _Optional[str] = ..., expected: _Optional[_Union[FunctionIdentity, _Mapping]] = ...) -> None: ...

class RestoreFunctionResponse(_message.Message):
    __slots__ = ("move", "function", "group_restored")
    MOVE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    GROUP_RESTORED_FIELD_NUMBER: _ClassVar[int]
    move: FunctionMove
    function: _pci_pb2.PciFunction
    group_restored: _containers.RepeatedCompositeFieldContainer[FunctionMove]
    def __init__(self, move: _Optional[_Union[FunctionMove, _Mapping]] = ..., function: _Optional[_Union[_pci_pb2.PciFunction, _Mapping]] = ..., group_restored: _Optional[_Iterable[_Union[FunctionMove, _Mapping]]] = ...) -> None: ...

class InspectFunctionRequest(_message.Message):
    __slots__ = ("pci_address",)
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    pci_address: str
    def __init__(self, pci_address: _Optional[str] = ...) -> None: ...

class InspectFunctionResponse(_message.Message):
    __slots__ = ("function", "assignability", "serial_number")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNABILITY_FIELD_NUMBER: _ClassVar[int]
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    function: _pci_pb2.PciFunction
    assignability: _pci_pb2.Assignability
    serial_number: str
    def __init__(self, function: _Optional[_Union[_pci_pb2.PciFunction, _Mapping]] = ..., assignability: _Optional[_Union[_pci_pb2.Assignability, _Mapping]] = ..., serial_number: _Optional[str] = ...) -> None: ...

class ListFunctionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFunctionsResponse(_message.Message):
    __slots__ = ("functions", "iommu_enabled", "vfio_available")
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    IOMMU_ENABLED_FIELD_NUMBER: _ClassVar[int]
    VFIO_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    functions: _containers.RepeatedCompositeFieldContainer[InspectFunctionResponse]
    iommu_enabled: bool
    vfio_available: bool
    def __init__(self, functions: _Optional[_Iterable[_Union[InspectFunctionResponse, _Mapping]]] = ..., iommu_enabled: _Optional[bool] = ..., vfio_available: _Optional[bool] = ...) -> None: ...
