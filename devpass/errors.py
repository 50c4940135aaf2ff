"""Domain errors and their one mapping to gRPC status codes and ErrorInfo reasons.

Every refusal devpass sends is a gRPC status with a `google.rpc.ErrorInfo` detail whose
domain is "devpass" and whose reason is the error class's `reason`. `to_status` builds
that status; `from_rpc_error` turns a received one back into the same error class.
"""

from __future__ import annotations

from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "devpass"


class DevpassError(Exception):
    """Base of every error that devpass reports to a caller.

    `metadata` contains the subject of the error (address, host, name) as strings, and
    travels in the ErrorInfo so clients can act on it without parsing the message.
    """

    reason: ClassVar[str] = "INTERNAL"
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata)

    def to_status(self) -> grpc.Status:
        """Build the gRPC status, with ErrorInfo, that reports this error."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=_CODE_NUMBERS[self.code], message=self.message, details=[detail])

        return rpc_status.to_status(status)


class InvalidPciAddress(DevpassError):
    reason = "INVALID_PCI_ADDRESS"
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, text: str) -> None:
        super().__init__(
            f"invalid PCI address {text!r}: expected dddd:bb:dd.f or bb:dd.f in hex, "
            "for example 0000:a2:00.0 (see `lspci -D`)",
            pci_address=text[:64],
        )


class InvalidName(DevpassError):
    reason = "INVALID_NAME"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidArgument(DevpassError):
    reason = "INVALID_ARGUMENT"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidPageToken(DevpassError):
    reason = "INVALID_PAGE_TOKEN"
    code = grpc.StatusCode.INVALID_ARGUMENT


class PciDeviceNotFound(DevpassError):
    """The host has no PCI function at the address."""

    reason = "PCI_DEVICE_NOT_FOUND"
    code = grpc.StatusCode.NOT_FOUND


class DeviceNotFound(DevpassError):
    """The registry has no device with the id or name."""

    reason = "DEVICE_NOT_FOUND"
    code = grpc.StatusCode.NOT_FOUND


class NameTaken(DevpassError):
    reason = "NAME_TAKEN"
    code = grpc.StatusCode.ALREADY_EXISTS


class DeviceAlreadyRegistered(DevpassError):
    reason = "DEVICE_ALREADY_REGISTERED"
    code = grpc.StatusCode.ALREADY_EXISTS


class DeviceInUse(DevpassError):
    reason = "DEVICE_IN_USE"
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeviceNotPresent(DevpassError):
    """The registered device no longer shows on its host."""

    reason = "DEVICE_NOT_PRESENT"
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeviceNotAssignable(DevpassError):
    """The function can never go to a virtual machine (a PCI bridge)."""

    reason = "DEVICE_NOT_ASSIGNABLE"
    code = grpc.StatusCode.FAILED_PRECONDITION


def bridge_not_assignable(pci_address: str, host: str = "") -> DeviceNotAssignable:
    """Build the error for a PCI bridge, which routes traffic and vfio-pci refuses."""
    where = f" on host {host}" if host else ""
    return DeviceNotAssignable(
        f"{pci_address}{where} is a PCI bridge; bridges route traffic for the devices behind "
        "them and cannot be passed through. Register the devices behind it instead",
        pci_address=pci_address,
    )


class IommuUnavailable(DevpassError):
    reason = "IOMMU_UNAVAILABLE"
    code = grpc.StatusCode.FAILED_PRECONDITION


IOMMU_FIX = (
    "enable the IOMMU in the firmware (VT-d or AMD-Vi) and add intel_iommu=on (Intel) "
    "or amd_iommu=on (AMD) to the kernel command line, then reboot"
)


def iommu_unavailable(pci_address: str, host: str = "") -> IommuUnavailable:
    """Build the error for a function that sits in no IOMMU group."""
    where = f" on host {host}" if host else ""
    return IommuUnavailable(
        f"{pci_address}{where} has no IOMMU group because the host runs without an IOMMU: {IOMMU_FIX}",
        pci_address=pci_address,
        **({"host": host} if host else {}),
    )


class VfioUnavailable(DevpassError):
    reason = "VFIO_UNAVAILABLE"
    code = grpc.StatusCode.FAILED_PRECONDITION


class IommuGroupNotViable(DevpassError):
    reason = "IOMMU_GROUP_NOT_VIABLE"
    code = grpc.StatusCode.FAILED_PRECONDITION


class HostUnknown(DevpassError):
    reason = "HOST_UNKNOWN"
    code = grpc.StatusCode.NOT_FOUND


class HostRequired(DevpassError):
    """The request left out the host, and the fleet does not have exactly one."""

    reason = "HOST_REQUIRED"
    code = grpc.StatusCode.INVALID_ARGUMENT


class HostUnavailable(DevpassError):
    reason = "HOST_UNAVAILABLE"
    code = grpc.StatusCode.UNAVAILABLE


class RegistryUnavailable(DevpassError):
    reason = "REGISTRY_UNAVAILABLE"
    code = grpc.StatusCode.UNAVAILABLE


class HostCriticalDevice(DevpassError):
    reason = "HOST_CRITICAL_DEVICE"
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeviceBusy(DevpassError):
    reason = "DEVICE_BUSY"
    code = grpc.StatusCode.FAILED_PRECONDITION


class IdentityMismatch(DevpassError):
    reason = "IDENTITY_MISMATCH"
    code = grpc.StatusCode.FAILED_PRECONDITION


class SriovPfHasVfs(DevpassError):
    """A physical function with enabled virtual functions cannot leave its driver."""

    reason = "SRIOV_PF_HAS_VFS"
    code = grpc.StatusCode.FAILED_PRECONDITION


class WriteTimedOut(DevpassError):
    """A sysfs write did not return within its deadline; metadata contains the device state."""

    reason = "WRITE_TIMED_OUT"
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class WritePending(DevpassError):
    """An earlier sysfs write to the device has not returned yet."""

    reason = "WRITE_PENDING"
    code = grpc.StatusCode.FAILED_PRECONDITION


class BindFailed(DevpassError):
    """A bind step failed and the device was rolled back; metadata records how the rollback went."""

    reason = "BIND_FAILED"
    code = grpc.StatusCode.ABORTED


def _all_error_classes() -> dict[str, type[DevpassError]]:
    pending: list[type[DevpassError]] = [DevpassError]
    found: dict[str, type[DevpassError]] = {}
    while pending:
        cls = pending.pop()
        found[cls.reason] = cls
        pending.extend(cls.__subclasses__())

    return found


_BY_REASON = _all_error_classes()
_CODE_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}
_CODES_BY_NUMBER = {number: code for code, number in _CODE_NUMBERS.items()}
assert _CODE_NUMBERS[grpc.StatusCode.NOT_FOUND] == code_pb2.NOT_FOUND


def error_class(reason: str) -> type[DevpassError]:
    """Return the error class for an ErrorInfo reason, or the base class when unknown."""
    return _BY_REASON.get(reason, DevpassError)


def from_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]) -> DevpassError:
    """Rebuild the typed error that a peer reported."""
    cls = error_class(reason)
    error = cls.__new__(cls)
    DevpassError.__init__(error, message, **metadata)
    if cls is DevpassError:
        # An unknown reason keeps the peer's code, so callers still branch on it.
        error.code = code  # type: ignore[misc]
        error.reason = reason or code.name  # type: ignore[misc]

    return error


def from_rpc_error(err: grpc.RpcError) -> DevpassError | None:
    """Return the devpass error carried by a failed call, or None when it carries none."""
    status = rpc_status.from_call(err)
    if status is None:
        return None

    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
                return from_status(code, status.message, info.reason, dict(info.metadata))

    return None
