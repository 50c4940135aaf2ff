from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from devpass import errors

# The reasons and codes the API documents; a change here is a change of the public contract.
DOCUMENTED = {
    "INVALID_PCI_ADDRESS": grpc.StatusCode.INVALID_ARGUMENT,
    "INVALID_NAME": grpc.StatusCode.INVALID_ARGUMENT,
    "PCI_DEVICE_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "DEVICE_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "NAME_TAKEN": grpc.StatusCode.ALREADY_EXISTS,
    "DEVICE_ALREADY_REGISTERED": grpc.StatusCode.ALREADY_EXISTS,
    "DEVICE_IN_USE": grpc.StatusCode.FAILED_PRECONDITION,
    "IOMMU_UNAVAILABLE": grpc.StatusCode.FAILED_PRECONDITION,
    "VFIO_UNAVAILABLE": grpc.StatusCode.FAILED_PRECONDITION,
    "IOMMU_GROUP_NOT_VIABLE": grpc.StatusCode.FAILED_PRECONDITION,
    "HOST_CRITICAL_DEVICE": grpc.StatusCode.FAILED_PRECONDITION,
    "DEVICE_BUSY": grpc.StatusCode.FAILED_PRECONDITION,
    "IDENTITY_MISMATCH": grpc.StatusCode.FAILED_PRECONDITION,
    "HOST_UNKNOWN": grpc.StatusCode.NOT_FOUND,
    "HOST_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "BIND_FAILED": grpc.StatusCode.ABORTED,
}


@pytest.mark.parametrize(("reason", "code"), sorted(DOCUMENTED.items()))
def test_reason_maps_to_code(reason: str, code: grpc.StatusCode) -> None:
    cls = errors.error_class(reason)

    assert cls.reason == reason
    assert cls.code == code


@pytest.mark.parametrize("reason", sorted(DOCUMENTED))
def test_status_round_trip(reason: str) -> None:
    cls = errors.error_class(reason)
    original = cls.__new__(cls)
    errors.DevpassError.__init__(original, f"message for {reason}", host="h1")
    status = original.to_status()

    assert status.code == cls.code
    assert status.details == f"message for {reason}"

    rebuilt = errors.from_status(status.code, status.details, reason, {"host": "h1"})
    assert type(rebuilt) is cls
    assert rebuilt.metadata == {"host": "h1"}


def test_status_carries_error_info() -> None:
    status = errors.NameTaken("name 'gpu0' is taken", name="gpu0", owner_host="h2").to_status()
    trailer = dict(status.trailing_metadata)
    decoded = rpc_status.status_pb2.Status.FromString(trailer["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    decoded.details[0].Unpack(info)

    assert decoded.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert info.domain == "devpass"
    assert info.reason == "NAME_TAKEN"
    assert dict(info.metadata) == {"name": "gpu0", "owner_host": "h2"}


def test_unknown_reason_keeps_peer_code() -> None:
    rebuilt = errors.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", "QUOTA", {})

    assert type(rebuilt) is errors.DevpassError
    assert rebuilt.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rebuilt.reason == "QUOTA"


def test_iommu_unavailable_says_how_to_enable() -> None:
    error = errors.iommu_unavailable("0000:a2:00.0", host="h1")

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "intel_iommu=on" in error.message
    assert "amd_iommu=on" in error.message
    assert error.metadata == {"pci_address": "0000:a2:00.0", "host": "h1"}
