from devpass.v1 import pci_pb2 as _pci_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
