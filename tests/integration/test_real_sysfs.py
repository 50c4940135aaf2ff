"""Real input: this machine's own /sys, read only, against pciutils and through a real agent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from agent.pciids import PciIds
from agent.sysfs import Sysfs
from devpass import errors
from devpass.v1 import devices_pb2, devices_pb2_grpc
from tests.conftest import Processes, wait_for_hosts

pytestmark = pytest.mark.realsys


def _lspci() -> dict[str, dict[str, str]]:
    """Parse `lspci -D -n -vmm -k` into one dict of fields per slot."""
    if shutil.which("lspci") is None:
        pytest.fail("lspci is missing: `make test` installs pciutils")
    output = subprocess.run(
        ["lspci", "-D", "-n", "-vmm", "-k"], capture_output=True, text=True, check=True
    ).stdout
    records: dict[str, dict[str, str]] = {}
    for block in output.strip().split("\n\n"):
        fields = dict(line.split(":\t", 1) for line in block.splitlines() if ":\t" in line)
        records[fields["Slot"]] = fields

    return records


def test_listing_matches_lspci() -> None:
    expected = _lspci()
    functions = {str(f.address): f for f in Sysfs(Path("/sys"), PciIds.load()).list_functions()}

    assert sorted(functions) == sorted(expected)
    for slot, fields in expected.items():
        function = functions[slot]
        assert function.vendor_id == fields["Vendor"], slot
        assert function.device_id == fields["Device"], slot
        assert f"{function.class_code >> 8:04x}" == fields["Class"], slot
        assert function.driver == fields.get("Driver"), slot
        if "SVendor" in fields:
            assert function.subsystem_vendor_id == fields["SVendor"], slot
            assert function.subsystem_device_id == fields["SDevice"], slot


def test_real_agent_registration(processes: Processes, tmp_path: Path) -> None:
    sysfs = Sysfs(Path("/sys"))
    first = next(f.address for f in sysfs.list_functions() if not f.is_bridge)
    controller = processes.controller(tmp_path / "state")
    agent = processes.start(
        "agent-real", "agent", "--controller", controller.address, "--host-name", "real-host"
    )
    channel = grpc.insecure_channel(controller.address)
    wait_for_hosts(channel, {"real-host"})
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    request = devices_pb2.RegisterDeviceRequest(pci_address=str(first))

    if sysfs.iommu_enabled():
        device = stub.RegisterDevice(request)
        assert device.pci_address == str(first)
        assert device.host == "real-host"
        return

    with pytest.raises(grpc.RpcError) as caught:
        stub.RegisterDevice(request)
    error = errors.from_rpc_error(caught.value)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error is not None
    assert error.reason == "IOMMU_UNAVAILABLE"
    assert "intel_iommu=on" in error.message
    listed = stub.ListDevices(devices_pb2.ListDevicesRequest())
    assert list(listed.devices) == []
    assert '"simulated": false' in agent.log()
