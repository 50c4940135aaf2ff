"""The registry outlives the controller process."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc

from devpass.v1 import devices_pb2, devices_pb2_grpc
from tests.conftest import Processes, free_port, wait_for_hosts


def _all_devices(stub: devices_pb2_grpc.DeviceServiceStub) -> list[tuple[str, str, str, str]]:
    response = stub.ListDevices(devices_pb2.ListDevicesRequest(), timeout=20)
    return [(d.id, d.name, d.host, d.pci_address) for d in response.devices]


def test_restart_keeps_devices(processes: Processes, tmp_path: Path) -> None:
    # A fixed port, so the agents find the restarted controller where they left it.
    address = f"127.0.0.1:{free_port()}"
    state_dir = tmp_path / "state"
    controller = processes.start(
        "controller",
        "controller",
        "--listen",
        address,
        "--state-dir",
        str(state_dir),
        "--heartbeat-interval",
        "0.3",
    )
    processes.simulated_agent(address, "two-hosts-a.yaml")
    processes.simulated_agent(address, "two-hosts-b.yaml")
    channel = grpc.insecure_channel(address)
    wait_for_hosts(channel, {"node-a", "node-b"})
    stub = devices_pb2_grpc.DeviceServiceStub(channel)
    stub.RegisterDevice(devices_pb2.RegisterDeviceRequest(host="node-a", pci_address="a2:00.0"))
    stub.RegisterDevice(devices_pb2.RegisterDeviceRequest(host="node-b", pci_address="a2:00.0"))
    stub.RegisterDevice(
        devices_pb2.RegisterDeviceRequest(host="node-b", pci_address="c1:00.0", name="b-a6000")
    )
    before = _all_devices(stub)

    assert controller.stop(signal.SIGKILL) == -signal.SIGKILL
    restarted = processes.start(
        "controller-2",
        "controller",
        "--listen",
        address,
        "--state-dir",
        str(state_dir),
        "--heartbeat-interval",
        "0.3",
    )
    wait_for_hosts(channel, {"node-a", "node-b"})

    assert _all_devices(stub) == before
    assert [name for _, name, _, _ in before] == ["pci-0000-a2-00-0", "pci-0000-a2-00-0.node-b", "b-a6000"]
    again = stub.GetDevice(devices_pb2.GetDeviceRequest(id_or_name="b-a6000"))
    assert again.driver == "nvidia"
    assert again.host_available is True
    assert "registry_opened" in restarted.log()
