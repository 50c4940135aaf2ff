"""Inputs from real failures, each with the outcome an operator expects."""

from __future__ import annotations

from pathlib import Path

import grpc

from devpass.v1 import devices_pb2
from tests.conftest import Processes, start_fleet
from tests.integration.helpers import rejected

Code = grpc.StatusCode


def test_address_forms(processes: Processes, tmp_path: Path) -> None:
    # One host only, so every call leaves the host out.
    fleet = start_fleet(processes, tmp_path / "state", {"l4-01": "l4.yaml"})
    register = fleet.devices.RegisterDevice

    first = register(devices_pb2.RegisterDeviceRequest(pci_address="A2:00.0"))
    assert first.pci_address == "0000:a2:00.0"
    assert first.name == "pci-0000-a2-00-0"
    assert first.host == "l4-01"
    assert first.iommu_group == 82

    rejected(
        register,
        devices_pb2.RegisterDeviceRequest(pci_address="0000:A2:00.0"),
        Code.ALREADY_EXISTS,
        "DEVICE_ALREADY_REGISTERED",
    )
    rejected(
        register,
        devices_pb2.RegisterDeviceRequest(pci_address="0000:82.0.0"),
        Code.INVALID_ARGUMENT,
        "INVALID_PCI_ADDRESS",
    )
    rejected(
        register,
        devices_pb2.RegisterDeviceRequest(pci_address="../../../../etc/passwd"),
        Code.INVALID_ARGUMENT,
        "INVALID_PCI_ADDRESS",
    )
    # The agent was asked once, for A2:00.0; neither invalid address reached it.
    assert fleet.agents["l4-01"].log().count("InspectFunction") == 1

    vmd = register(devices_pb2.RegisterDeviceRequest(pci_address="10001:8a:00.0"))
    assert vmd.pci_address == "10001:8a:00.0"
    assert vmd.name == "pci-10001-8a-00-0"
    assert vmd.type == "pci"

    listed = fleet.devices.ListDevices(devices_pb2.ListDevicesRequest())
    assert [d.pci_address for d in listed.devices] == ["0000:a2:00.0", "10001:8a:00.0"]


def test_no_iommu_host(processes: Processes, tmp_path: Path) -> None:
    fleet = start_fleet(processes, tmp_path / "state", {"noiommu-01": "no-iommu.yaml"})

    error = rejected(
        fleet.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(pci_address="0000:a2:00.0", name="gpu"),
        Code.FAILED_PRECONDITION,
        "IOMMU_UNAVAILABLE",
    )

    assert "intel_iommu=on" in error.message
    assert "amd_iommu=on" in error.message
    assert error.metadata["host"] == "noiommu-01"
    assert list(fleet.devices.ListDevices(devices_pb2.ListDevicesRequest()).devices) == []
    available = fleet.devices.ListAvailableDevices(devices_pb2.ListAvailableDevicesRequest())
    gpu = next(d for d in available.devices if d.function.pci_address == "0000:a2:00.0")
    assert gpu.assignability.assignable is False
    assert {b.reason for b in gpu.assignability.blockers} == {"IOMMU_UNAVAILABLE", "VFIO_UNAVAILABLE"}
