"""Binding, attaching and restoring through the controller, against in-process simulated agents."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from devpass.v1 import devices_pb2, devices_pb2_grpc
from tests.conftest import Processes, ServerProcess, wait_for_hosts
from tests.inprocess import InProcessAgent
from tests.integration.helpers import rejected

Code = grpc.StatusCode
L4 = "0000:a2:00.0"


class Setup:
    """A controller process and in-process agents that the test can reach into."""

    def __init__(self, processes: Processes, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.controller: ServerProcess = processes.controller(tmp_path / "state")
        self.channel = grpc.insecure_channel(self.controller.address)
        self.devices = devices_pb2_grpc.DeviceServiceStub(self.channel)
        self.agents: list[InProcessAgent] = []

    def agent(self, description: str, **options: object) -> InProcessAgent:
        workdir = self.tmp_path / f"agent-{len(self.agents)}"
        agent = InProcessAgent(self.controller.address, workdir, description, **options).start()  # type: ignore[arg-type]
        self.agents.append(agent)
        wait_for_hosts(self.channel, {agent.name})
        return agent

    def register(self, pci_address: str, **fields: object) -> devices_pb2.Device:
        request = devices_pb2.RegisterDeviceRequest(pci_address=pci_address, **fields)  # type: ignore[arg-type]
        return self.devices.RegisterDevice(request, timeout=30)

    def get(self, id_or_name: str) -> devices_pb2.Device:
        return self.devices.GetDevice(devices_pb2.GetDeviceRequest(id_or_name=id_or_name), timeout=10)

    def names(self) -> list[str]:
        return [
            d.name for d in self.devices.ListDevices(devices_pb2.ListDevicesRequest(), timeout=10).devices
        ]

    def available(self, host: str = "") -> dict[str, devices_pb2.AvailableDevice]:
        response = self.devices.ListAvailableDevices(
            devices_pb2.ListAvailableDevicesRequest(host=host), timeout=10
        )
        return {d.function.pci_address: d for d in response.devices}

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()


@pytest.fixture
def setup(processes: Processes, tmp_path: Path) -> Iterator[Setup]:
    built = Setup(processes, tmp_path)
    try:
        yield built
    finally:
        built.close()


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_register_with_bind_and_unregister(setup: Setup) -> None:
    agent = setup.agent("l4.yaml")

    device = setup.register(L4, name="l4", bind_vfio=True)

    assert device.bound_to_vfio is True
    assert device.driver == "vfio-pci"
    assert device.bound_by_devpass is True
    assert device.original_driver == "nvidia"
    assert agent.driver(L4) == "vfio-pci"
    assert (agent.host.dev_root / "vfio" / "82").exists()

    response = setup.devices.UnregisterDevice(devices_pb2.UnregisterDeviceRequest(id_or_name="l4"))

    assert response.restored_driver == "nvidia"
    assert agent.driver(L4) == "nvidia"
    assert setup.names() == []


def test_bind_and_unbind(setup: Setup) -> None:
    agent = setup.agent("l4.yaml")
    setup.register(L4, name="l4")
    assert agent.driver(L4) == "nvidia"

    bound = setup.devices.BindDevice(devices_pb2.BindDeviceRequest(id_or_name="l4"))
    assert bound.device.bound_to_vfio is True
    assert agent.driver(L4) == "vfio-pci"

    unbound = setup.devices.UnbindDevice(devices_pb2.UnbindDeviceRequest(id_or_name="l4"))
    assert unbound.restored_driver == "nvidia"
    assert unbound.device.bound_to_vfio is False
    assert unbound.device.bound_by_devpass is False
    assert agent.driver(L4) == "nvidia"


def test_attach_detach(setup: Setup) -> None:
    agent = setup.agent("l4.yaml")
    setup.register(L4, name="l4")

    attached = setup.devices.AttachDevice(
        devices_pb2.AttachDeviceRequest(id_or_name="l4", instance_id="vm-1")
    )

    assert attached.attached_to == "vm-1"
    assert attached.bound_to_vfio is True
    assert agent.driver(L4) == "vfio-pci"
    error = rejected(
        setup.devices.AttachDevice,
        devices_pb2.AttachDeviceRequest(id_or_name="l4", instance_id="vm-2"),
        Code.FAILED_PRECONDITION,
        "DEVICE_IN_USE",
    )
    assert error.metadata["attached_to"] == "vm-1"
    rejected(
        setup.devices.UnregisterDevice,
        devices_pb2.UnregisterDeviceRequest(id_or_name="l4"),
        Code.FAILED_PRECONDITION,
        "DEVICE_IN_USE",
    )
    rejected(
        setup.devices.UnbindDevice,
        devices_pb2.UnbindDeviceRequest(id_or_name="l4"),
        Code.FAILED_PRECONDITION,
        "DEVICE_IN_USE",
    )
    assert setup.get("l4").attached_to == "vm-1"

    detached = setup.devices.DetachDevice(devices_pb2.DetachDeviceRequest(id_or_name="l4"))
    assert detached.attached_to == ""
    assert detached.bound_to_vfio is True
    response = setup.devices.UnregisterDevice(devices_pb2.UnregisterDeviceRequest(id_or_name="l4"))
    assert response.restored_driver == "nvidia"


def test_vfio_unavailable(setup: Setup) -> None:
    agent = setup.agent("no-vfio.yaml")

    error = rejected(
        setup.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(pci_address=L4, bind_vfio=True),
        Code.FAILED_PRECONDITION,
        "VFIO_UNAVAILABLE",
    )

    assert "modprobe vfio-pci" in error.message
    assert setup.names() == []
    assert agent.host.kernel.writes == []


def test_host_critical_root_disk(setup: Setup) -> None:
    agent = setup.agent("l4.yaml")
    setup.register("0000:01:00.0", name="boot-disk")

    error = rejected(
        setup.devices.BindDevice,
        devices_pb2.BindDeviceRequest(id_or_name="boot-disk"),
        Code.FAILED_PRECONDITION,
        "HOST_CRITICAL_DEVICE",
    )

    assert "mounted" in error.message
    assert "force" in error.message
    assert agent.host.kernel.writes == []
    assert agent.driver("0000:01:00.0") == "nvme"
    nic = rejected(
        setup.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(pci_address="0000:04:00.0", bind_vfio=True),
        Code.FAILED_PRECONDITION,
        "HOST_CRITICAL_DEVICE",
    )
    assert "default route" in nic.message
    assert setup.names() == ["boot-disk"]

    forced = setup.devices.BindDevice(devices_pb2.BindDeviceRequest(id_or_name="boot-disk", force=True))
    assert forced.device.bound_to_vfio is True


def test_write_timeout_reports_state_and_repairs(setup: Setup) -> None:
    agent = setup.agent("l4.yaml")
    setup.register(L4, name="l4")
    agent.host.kernel.inject_fault("unbind", "HANG")

    started = time.monotonic()
    error = rejected(
        setup.devices.BindDevice,
        devices_pb2.BindDeviceRequest(id_or_name="l4"),
        Code.DEADLINE_EXCEEDED,
        "WRITE_TIMED_OUT",
    )

    assert time.monotonic() - started < 10
    assert error.metadata["driver"] == "nvidia"
    assert error.metadata["driver_override"] == "vfio-pci"
    rejected(
        setup.devices.BindDevice,
        devices_pb2.BindDeviceRequest(id_or_name="l4"),
        Code.FAILED_PRECONDITION,
        "WRITE_PENDING",
    )
    agent.host.kernel.release_hangs()
    _eventually(lambda: agent.host.kernel.hanging_writes == 0 and _override(agent, L4) is None)
    assert agent.driver(L4) == "nvidia"
    bound = setup.devices.BindDevice(devices_pb2.BindDeviceRequest(id_or_name="l4"))
    assert bound.device.bound_to_vfio is True


def test_identity_mismatch_marks_stale(setup: Setup, tmp_path: Path) -> None:
    first = setup.agent("l4.yaml")
    device = setup.register(L4, name="l4")
    first.stop()
    wait_for_hosts(setup.channel, {"l4-01"}, available=False)
    # The card in the slot was replaced while the agent was down.
    replaced = setup.agent("l4-replaced.yaml")

    error = rejected(
        setup.devices.BindDevice,
        devices_pb2.BindDeviceRequest(id_or_name="l4"),
        Code.FAILED_PRECONDITION,
        "IDENTITY_MISMATCH",
    )

    assert "device_id 27b8 -> 2331" in error.message
    assert replaced.host.kernel.writes == []
    assert setup.get(device.id).stale is True
    again = rejected(
        setup.devices.AttachDevice,
        devices_pb2.AttachDeviceRequest(id_or_name="l4", instance_id="vm-1"),
        Code.FAILED_PRECONDITION,
        "IDENTITY_MISMATCH",
    )
    assert "stale" in again.message
    assert setup.get("l4").attached_to == ""
    assert replaced.host.kernel.writes == []


def test_removed_device(setup: Setup) -> None:
    agent = setup.agent("l4.yaml")
    setup.register(L4, name="l4", bind_vfio=True)
    agent.host.kernel.write(agent.device(L4) / "remove", "1")
    writes = len(agent.host.kernel.writes)

    _eventually(lambda: setup.get("l4").present is False)
    rejected(
        setup.devices.AttachDevice,
        devices_pb2.AttachDeviceRequest(id_or_name="l4", instance_id="vm-1"),
        Code.FAILED_PRECONDITION,
        "DEVICE_NOT_PRESENT",
    )
    response = setup.devices.UnregisterDevice(devices_pb2.UnregisterDeviceRequest(id_or_name="l4"))

    assert response.restored_driver == ""
    assert setup.names() == []
    assert len(agent.host.kernel.writes) == writes


def test_busy_holders(setup: Setup) -> None:
    agent = setup.agent("busy-holders.yaml")
    address = "0000:41:00.0"

    started = time.monotonic()
    error = rejected(
        setup.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(pci_address=address, name="h100-a", bind_vfio=True),
        Code.FAILED_PRECONDITION,
        "DEVICE_BUSY",
    )

    assert time.monotonic() - started < 10
    assert "pid 2001 (nvidia-persistenced)" in error.message
    assert "pid 2002 (dcgm-exporter)" in error.message
    assert error.metadata["pids"] == "2001,2002"
    assert agent.host.kernel.writes == []
    assert agent.driver(address) == "nvidia"
    assert setup.names() == []


def test_group_sibling_mgmt_nic(setup: Setup) -> None:
    agent = setup.agent("group-sibling-mgmt-nic.yaml")

    error = rejected(
        setup.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(pci_address="0000:02:00.1", bind_vfio=True),
        Code.FAILED_PRECONDITION,
        "IOMMU_GROUP_NOT_VIABLE",
    )

    assert "0000:02:00.0 (tg3, host-critical:" in error.message
    assert "default route" in error.message
    assert error.metadata["siblings"] == "0000:02:00.0"
    assert agent.host.kernel.writes == []
    assert setup.names() == []
    candidate = setup.available()["0000:02:00.1"]
    assert candidate.assignability.assignable is False
    assert [b.reason for b in candidate.assignability.blockers] == ["IOMMU_GROUP_NOT_VIABLE"]
    assert list(candidate.assignability.blockers[0].pci_addresses) == ["0000:02:00.0"]


def test_gpu_audio_group(setup: Setup) -> None:
    agent = setup.agent("gpu-audio-group.yaml")
    setup.register("0000:01:00.0", name="gtx")
    setup.register("0000:01:00.1", name="gtx-audio")

    error = rejected(
        setup.devices.BindDevice,
        devices_pb2.BindDeviceRequest(id_or_name="gtx"),
        Code.FAILED_PRECONDITION,
        "IOMMU_GROUP_NOT_VIABLE",
    )
    assert "0000:01:00.1" in error.message
    assert "include_group" in error.message
    assert agent.host.kernel.writes == []

    bound = setup.devices.BindDevice(devices_pb2.BindDeviceRequest(id_or_name="gtx", include_group=True))

    assert list(bound.group_bound) == ["0000:01:00.1"]
    assert agent.driver("0000:01:00.0") == "vfio-pci"
    assert agent.driver("0000:01:00.1") == "vfio-pci"
    assert agent.driver("0000:00:01.0") == "pcieport"
    gpus = setup.devices.ListDevices(devices_pb2.ListDevicesRequest(type="gpu")).devices
    assert [d.name for d in gpus] == ["gtx"]
    _eventually(lambda: setup.get("gtx-audio").bound_to_vfio)

    unbound = setup.devices.UnbindDevice(devices_pb2.UnbindDeviceRequest(id_or_name="gtx"))

    assert unbound.restored_driver == "nvidia"
    assert list(unbound.group_restored) == ["0000:01:00.1 snd_hda_intel"]
    assert agent.driver("0000:01:00.0") == "nvidia"
    assert agent.driver("0000:01:00.1") == "snd_hda_intel"


def test_same_id_siblings(setup: Setup) -> None:
    agent = setup.agent("same-id-siblings.yaml")
    request = devices_pb2.RegisterDeviceRequest(
        pci_address="0000:5e:00.2", bind_vfio=True, request_id="req-5e-2"
    )

    first = setup.devices.RegisterDevice(request)
    second = setup.devices.RegisterDevice(request)

    assert agent.driver("0000:5e:00.2") == "vfio-pci"
    assert agent.driver("0000:5e:00.3") == "iavf"
    assert second.id == first.id
    assert second.name == first.name
    assert setup.names() == [first.name]
    assert not any(path.endswith("new_id") for path, _ in agent.host.kernel.writes)
    changed = devices_pb2.RegisterDeviceRequest(
        pci_address="0000:5e:00.3", bind_vfio=True, request_id="req-5e-2"
    )
    rejected(setup.devices.RegisterDevice, changed, Code.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    assert agent.driver("0000:5e:00.3") == "iavf"


def test_bind_fails_rollback(setup: Setup) -> None:
    agent = setup.agent("bind-fails-rollback.yaml")
    address = "0000:86:00.0"
    agent.host.kernel.inject_fault("drivers_probe", "ENODEV", address=address)

    error = rejected(
        setup.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(pci_address=address, bind_vfio=True),
        Code.ABORTED,
        "BIND_FAILED",
    )

    assert error.metadata["rollback"] == "succeeded"
    assert error.metadata["driver"] == "nvme"
    assert "rolled back" in error.message
    assert agent.driver(address) == "nvme"
    assert _override(agent, address) is None
    assert setup.names() == []


def test_bind_fails_rollback_fails(setup: Setup) -> None:
    agent = setup.agent("bind-fails-rollback.yaml")
    address = "0000:86:00.0"
    agent.host.kernel.inject_fault("drivers_probe", "ENODEV", address=address, times=2)

    error = rejected(
        setup.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(pci_address=address, bind_vfio=True),
        Code.ABORTED,
        "BIND_FAILED",
    )

    assert error.metadata["rollback"] == "failed"
    assert error.metadata["driver"] == ""
    assert "no driver" in error.message
    assert agent.driver(address) is None
    _eventually(lambda: setup.available()[address].function.driver == "")


def test_late_vfs(setup: Setup) -> None:
    agent = setup.agent("late-vfs.yaml")
    pf = "0000:3b:00.0"
    setup.register(pf, name="cx6-pf0")
    assert not [a for a in setup.available() if a.startswith("0000:3b:00.") and a != pf]

    agent.host.kernel.write(agent.device(pf) / "sriov_numvfs", "4")

    vfs = {a: d for a, d in setup.available().items() if d.function.physfn == pf}
    assert sorted(vfs) == ["0000:3b:00.2", "0000:3b:00.3", "0000:3b:00.4", "0000:3b:00.5"]
    assert {d.function.device_id for d in vfs.values()} == {"101e"}
    vf = setup.register("0000:3b:00.3", name="cx6-vf1", bind_vfio=True)
    assert vf.bound_to_vfio is True
    assert agent.driver(pf) == "mlx5_core"
    error = rejected(
        setup.devices.BindDevice,
        devices_pb2.BindDeviceRequest(id_or_name="cx6-pf0"),
        Code.FAILED_PRECONDITION,
        "SRIOV_PF_HAS_VFS",
    )
    assert "0000:3b:00.2" in error.metadata["virtfns"]


def _override(agent: InProcessAgent, address: str) -> str | None:
    value = (agent.device(address) / "driver_override").read_text().strip()
    return None if value == "(null)" else value


def test_reconcile_after_reboot(setup: Setup) -> None:
    agent = setup.agent("l4.yaml")
    setup.register(L4, name="l4", bind_vfio=True)
    setup.register("0000:04:00.0", name="nic")
    agent.stop()
    # A reboot: the L4 comes back on nvidia; something outside devpass puts the NIC on vfio-pci.
    kernel, sysfs = agent.host.kernel, agent.host.sysfs_root
    kernel.write(agent.device(L4) / "driver_override", "\n")
    kernel.write(sysfs / "bus/pci/drivers/vfio-pci/unbind", L4)
    kernel.write(sysfs / "bus/pci/drivers_probe", L4)
    kernel.write(agent.device("0000:04:00.0") / "driver_override", "vfio-pci")
    kernel.write(sysfs / "bus/pci/drivers/bnxt_en/unbind", "0000:04:00.0")
    kernel.write(sysfs / "bus/pci/drivers_probe", "0000:04:00.0")
    assert agent.driver(L4) == "nvidia"

    restarted = setup.agent("l4.yaml", host=agent.host)

    _eventually(lambda: restarted.driver(L4) == "vfio-pci")
    _eventually(lambda: "device_bound_outside_devpass" in setup.controller.log())
    nic = setup.get("nic")
    assert nic.bound_to_vfio is True
    assert nic.bound_by_devpass is False
    assert restarted.driver("0000:04:00.0") == "vfio-pci"
    assert setup.get("l4").bound_by_devpass is True
