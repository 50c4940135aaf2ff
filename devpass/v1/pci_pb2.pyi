from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PciFunction(_message.Message):
    __slots__ = ("pci_address", "vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id", "class_code", "revision", "iommu_group", "driver", "driver_override", "numa_node", "vendor_name", "device_name", "physfn", "virtfns", "boot_vga", "type", "bound_to_vfio", "bound_by_devpass", "original_driver")
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEM_VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEM_DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_CODE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    IOMMU_GROUP_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    DRIVER_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    NUMA_NODE_FIELD_NUMBER: _ClassVar[int]
    VENDOR_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    PHYSFN_FIELD_NUMBER: _ClassVar[int]
    VIRTFNS_FIELD_NUMBER: _ClassVar[int]
    BOOT_VGA_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    BOUND_TO_VFIO_FIELD_NUMBER: _ClassVar[int]
    BOUND_BY_DEVPASS_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_DRIVER_FIELD_NUMBER: _ClassVar[int]
    pci_address: str
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_code: str
    revision: str
    iommu_group: int
    driver: str
    driver_override: str
    numa_node: int
    vendor_name: str
    device_name: str
    physfn: str
    virtfns: _containers.RepeatedScalarFieldContainer[str]
    boot_vga: bool
    type: str
    bound_to_vfio: bool
    bound_by_devpass: bool
    original_driver: str
    def __init__(self, pci_address: _Optional[str] = ..., vendor_id: _Optional[str] = ..., device_id: _Optional[str] = ..., subsystem_vendor_id: _Optional[str] = ..., subsystem_device_id: _Optional[str] = ..., class_code: _Optional[str] = ..., revision: _Optional[str] = ..., iommu_group: _Optional[int] = ..., driver: _Optional[str] = ..., driver_override: _Optional[str] = ..., numa_node: _Optional[int] = ..., vendor_name: _Optional[str] = ..., device_name: _Optional[str] = ..., physfn: _Optional[str] = ..., virtfns: _Optional[_Iterable[str]] = ..., boot_vga: _Optional[bool] = ..., type: _Optional[str] = ..., bound_to_vfio: _Optional[bool] = ..., bound_by_devpass: _Optional[bool] = ..., original_driver: _Optional[str] = ...) -> None: ...

class Assignability(_message.Message):
    __slots__ = ("assignable", "blockers")
    ASSIGNABLE_FIELD_NUMBER: _ClassVar[int]
    BLOCKERS_FIELD_NUMBER: _ClassVar[int]
    assignable: bool
    blockers: _containers.RepeatedCompositeFieldContainer[Blocker]
    def __init__(self, assignable: _Optional[bool] = ..., blockers: _Optional[_Iterable[_Union[Blocker, _Mapping]]] = ...) -> None: ...

class Blocker(_message.Message):
    __slots__ = ("reason", "message", "pci_addresses")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    pci_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ..., pci_addresses: _Optional[_Iterable[str]] = ...) -> None: ...
