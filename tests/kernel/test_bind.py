"""devpass's bind path on a real Linux kernel: the agent in a QEMU guest, the controller on the host.

One guest serves the module. The agent binds and restores the guest's std VGA
(1234:1111 on bochs-drm) and its e1000e through the controller's API, and the tests read
the guest's sysfs with plain shell commands to check what the kernel did.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from devpass import errors
from devpass.v1 import devices_pb2, devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc
from tests.conftest import Processes, ServerProcess, wait_for_hosts
from tests.kernel.assets import REPO_ROOT, GuestAssets, cache_dir, resolve_modules
from tests.kernel.guest import Guest, free_port
from tests.kernel.test_guest import (
    E1000E_IDS,
    GUEST_AGENT_PORT,
    GUEST_CONTROLLER_PORT,
    HEARTBEAT_INTERVAL,
    VGA_IDS,
    Function,
    find_function,
    list_functions,
    read_driver,
)

HOST_NAME = "qemu-guest"
AGENT_START_TIMEOUT = 120.0
ICH9_SLOT = "0000:00:1f."


@dataclass
class Rig:
    guest: Guest
    controller: ServerProcess
    channel: grpc.Channel
    devices: devices_pb2_grpc.DeviceServiceStub
    agent_host_port: int
    assets: GuestAssets
    starts: int = 0

    @property
    def state_dir(self) -> str:
        return str(self.guest.workdir / "agent-state")

    def start_agent(self) -> None:
        """Start the agent in the guest and wait for its first heartbeat."""
        self.starts += 1
        log_name = f"agent-{self.starts}.log"
        agent = [
            sys.executable,
            "-m",
            "agent",
            "--controller",
            f"10.0.2.100:{GUEST_CONTROLLER_PORT}",
            "--listen",
            f"0.0.0.0:{GUEST_AGENT_PORT}",
            "--insecure",
            "--advertise",
            f"127.0.0.1:{self.agent_host_port}",
            "--host-name",
            HOST_NAME,
            "--state-dir",
            self.state_dir,
            "--log-json",
        ]
        root = shlex.quote(str(REPO_ROOT))
        self.guest.spawn(f"cd {root} && PYTHONPATH={root} exec {shlex.join(agent)}", log_name)
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while True:
            status = self.guest.exit_status(log_name)
            if status is not None:
                raise AssertionError(f"the agent exited with {status}:\n{self.guest.read_log(log_name)}")
            try:
                wait_for_hosts(self.channel, {HOST_NAME}, timeout=2.0)
                if f"127.0.0.1:{self.agent_host_port}" in self._agent_address() and self._started(log_name):
                    return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def stop_agent(self) -> None:
        status, output = self.guest.run("pkill -KILL -f '[m] agent --controller' || true")
        assert status == 0, output
        wait_for_hosts(self.channel, {HOST_NAME}, available=False, timeout=30)

    def agent_log(self) -> str:
        return self.guest.read_log(f"agent-{self.starts}.log")

    def busybox(self, command: str) -> tuple[int, str]:
        busybox = shlex.quote(str(cache_dir() / "busybox-static" / "bin" / "busybox"))
        return self.guest.run(f"{busybox} {command}")

    def load_modules(self, *names: str) -> None:
        """Load kernel modules, and those they depend on, from the guest kernel's package."""
        modules_dir = cache_dir() / f"linux-image-{self.assets.kernel_release}" / "lib" / "modules"
        for module in resolve_modules(modules_dir / self.assets.kernel_release, names):
            status, output = self.busybox(f"insmod {shlex.quote(str(module.path))}")
            assert status == 0 or "File exists" in output, output

    def _agent_address(self) -> str:
        response = hosts_pb2_grpc.HostServiceStub(self.channel).ListHosts(
            hosts_pb2.ListHostsRequest(), timeout=5
        )
        return next(h.agent_address for h in response.hosts if h.name == HOST_NAME)

    def _started(self, log_name: str) -> bool:
        return "agent_started" in self.guest.read_log(log_name)


@pytest.fixture(scope="module")
def rig(
    start_guest: Callable[..., Guest], guest_assets: GuestAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("controller")
    processes = Processes(workdir)
    controller = processes.start(
        "controller",
        "controller",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(workdir / "state"),
        "--heartbeat-interval",
        str(HEARTBEAT_INTERVAL),
    )
    agent_host_port = free_port()
    guest = start_guest(
        guest_forwards={GUEST_CONTROLLER_PORT: int(controller.address.rsplit(":", 1)[1])},
        host_forwards={agent_host_port: GUEST_AGENT_PORT},
    )
    channel = grpc.insecure_channel(controller.address)
    built = Rig(
        guest, controller, channel, devices_pb2_grpc.DeviceServiceStub(channel), agent_host_port, guest_assets
    )
    built.start_agent()
    try:
        yield built
    finally:
        channel.close()
        processes.stop_all()


@pytest.fixture(scope="module")
def functions(rig: Rig) -> dict[str, Function]:
    return list_functions(rig.guest)


def _rejected(rig: Rig, call: Callable[..., object], request: object) -> errors.DevpassError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    error = errors.from_rpc_error(caught.value)
    assert error is not None, f"{caught.value}\n--- agent log ---\n{rig.agent_log()}"
    return error


def _vfio_node_exists(guest: Guest, group: int) -> bool:
    status, _ = guest.run(f"test -c /dev/vfio/{group}")
    return status == 0


def test_vga_register_bind_and_restore(rig: Rig, functions: dict[str, Function]) -> None:
    vga = find_function(functions, *VGA_IDS)
    assert vga.driver == "bochs-drm"
    assert vga.iommu_group is not None

    device = rig.devices.RegisterDevice(
        devices_pb2.RegisterDeviceRequest(
            host=HOST_NAME, pci_address=vga.address, name="guest-vga", bind_vfio=True
        ),
        timeout=60,
    )

    assert device.type == "gpu"
    assert device.vendor_id == "1234"
    assert device.iommu_group == vga.iommu_group
    assert device.bound_to_vfio is True
    assert device.original_driver == "bochs-drm"
    assert read_driver(rig.guest, vga.address) == "vfio-pci"
    assert _vfio_node_exists(rig.guest, vga.iommu_group)

    response = rig.devices.UnregisterDevice(
        devices_pb2.UnregisterDeviceRequest(id_or_name="guest-vga"), timeout=60
    )

    assert response.restored_driver == "bochs-drm"
    assert read_driver(rig.guest, vga.address) == "bochs-drm"
    assert not _vfio_node_exists(rig.guest, vga.iommu_group)


def test_e1000e_register_bind_and_restore(rig: Rig, functions: dict[str, Function]) -> None:
    nic = find_function(functions, *E1000E_IDS)
    assert nic.iommu_group is not None

    device = rig.devices.RegisterDevice(
        devices_pb2.RegisterDeviceRequest(
            host=HOST_NAME, pci_address=nic.address, name="guest-nic", bind_vfio=True
        ),
        timeout=60,
    )

    assert device.bound_to_vfio is True
    assert read_driver(rig.guest, nic.address) == "vfio-pci"
    assert _vfio_node_exists(rig.guest, nic.iommu_group)

    response = rig.devices.UnregisterDevice(
        devices_pb2.UnregisterDeviceRequest(id_or_name="guest-nic"), timeout=60
    )

    assert response.restored_driver == "e1000e"
    assert read_driver(rig.guest, nic.address) == "e1000e"


def test_ich9_function_group_not_viable(rig: Rig) -> None:
    # The guest loads no ICH9 drivers at boot. Loading the SMBus and LPC drivers puts two
    # of the three functions of the shared group on host drivers, as on a real machine.
    rig.load_modules("i2c_i801", "lpc_ich")
    functions = list_functions(rig.guest)
    ich9 = sorted(address for address in functions if address.startswith(ICH9_SLOT))
    assert len({functions[a].iommu_group for a in ich9}) == 1
    siblings = [a for a in ich9 if functions[a].driver is not None]
    assert len(siblings) == 2, [functions[a] for a in ich9]
    target = next(a for a in ich9 if functions[a].driver is None)

    error = _rejected(
        rig,
        rig.devices.RegisterDevice,
        devices_pb2.RegisterDeviceRequest(host=HOST_NAME, pci_address=target, bind_vfio=True),
    )

    assert error.reason == "IOMMU_GROUP_NOT_VIABLE"
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    for sibling in siblings:
        assert sibling in error.message
    assert error.metadata["siblings"].split(",") == siblings
    status, _ = rig.guest.run(f"test -e /sys/bus/pci/devices/{target}/driver")
    assert status != 0
    for sibling in siblings:
        assert read_driver(rig.guest, sibling) == functions[sibling].driver


def test_agent_killed_between_unbind_and_probe(rig: Rig, functions: dict[str, Function]) -> None:
    nic = find_function(functions, *E1000E_IDS)
    rig.stop_agent()
    # The agent's own binder, stopped by SIGKILL right after the unbind write returns. The
    # journal then records "binding", driver_override contains vfio-pci, and no driver is bound.
    crash = (
        "import os, signal\n"
        "from pathlib import Path\n"
        "from agent.journal import Journal\n"
        "from agent.kernel import SysfsWriter\n"
        "from agent.sysfs import Sysfs\n"
        "from agent.usage import HostUsageScanner\n"
        "from agent.vfio import Binder\n"
        "from devpass.pci import PciAddress\n"
        "class KilledAfterUnbind(SysfsWriter):\n"
        "    def write(self, path, value):\n"
        "        super().write(path, value)\n"
        "        if path.name == 'unbind':\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "root = Path('/sys')\n"
        f"journal = Journal(Path({rig.state_dir!r}) / 'journal.json')\n"
        "binder = Binder(Sysfs(root), KilledAfterUnbind(root), journal,\n"
        "                HostUsageScanner(root, Path('/proc'), Path('/dev')), dev_root=Path('/dev'))\n"
        f"binder.bind(PciAddress.parse({nic.address!r}))\n"
    )
    root = shlex.quote(str(REPO_ROOT))
    status, output = rig.guest.run(
        f"cd {root} && PYTHONPATH={root} {shlex.quote(sys.executable)} -c {shlex.quote(crash)}"
    )

    assert status == 128 + 9, output
    status, override = rig.guest.run(f"cat /sys/bus/pci/devices/{nic.address}/driver_override")
    assert override.strip() == "vfio-pci"
    status, _ = rig.guest.run(f"test -e /sys/bus/pci/devices/{nic.address}/driver")
    assert status != 0, "the e1000e should have no driver after the killed bind"

    rig.start_agent()

    assert read_driver(rig.guest, nic.address) == "e1000e"
    status, override = rig.guest.run(f"cat /sys/bus/pci/devices/{nic.address}/driver_override")
    assert override.strip() == "(null)"
    assert "device_repaired" in rig.agent_log()
    status, journal = rig.guest.run(f"cat {shlex.quote(rig.state_dir)}/journal.json")
    assert nic.address not in journal


def test_vfio_unavailable(rig: Rig, functions: dict[str, Function]) -> None:
    nic = find_function(functions, *E1000E_IDS)
    status, output = rig.busybox("rmmod vfio_pci")
    assert status == 0, output
    try:
        status, _ = rig.guest.run("test -d /sys/bus/pci/drivers/vfio-pci")
        assert status != 0

        error = _rejected(
            rig,
            rig.devices.RegisterDevice,
            devices_pb2.RegisterDeviceRequest(host=HOST_NAME, pci_address=nic.address, bind_vfio=True),
        )

        assert error.reason == "VFIO_UNAVAILABLE"
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "modprobe vfio-pci" in error.message
        assert read_driver(rig.guest, nic.address) == "e1000e"
        listed = rig.devices.ListDevices(devices_pb2.ListDevicesRequest(host=HOST_NAME), timeout=10)
        assert nic.address not in [d.pci_address for d in listed.devices]
    finally:
        rig.load_modules("vfio-pci")
        status, _ = rig.guest.run("test -d /sys/bus/pci/drivers/vfio-pci")
        assert status == 0
