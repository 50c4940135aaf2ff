"""The harness on a real guest kernel: IOMMU groups, drivers, the agent's reader, and a bind.

One guest serves the whole module. It boots q35 with an emulated Intel IOMMU, a std VGA
(1234:1111, bochs-drm) and an e1000e (8086:10d3) alone behind a PCIe root port. A
controller runs on the host, and the agent runs in the guest.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from devpass.v1 import devices_pb2, devices_pb2_grpc, hosts_pb2, hosts_pb2_grpc
from tests.conftest import Processes, ServerProcess, wait_for_hosts
from tests.kernel.assets import REPO_ROOT, GuestAssets
from tests.kernel.guest import Guest, free_port

# Ports inside the guest: the controller's forward on 10.0.2.100, and the agent's listener.
GUEST_CONTROLLER_PORT = 50051
GUEST_AGENT_PORT = 50052
HEARTBEAT_INTERVAL = 0.5
# The guest runs under TCG, where the agent takes several seconds to import grpc.
AGENT_START_TIMEOUT = 120.0
VGA_IDS = ("1234", "1111")
VGA_CLASS = 0x030000
E1000E_IDS = ("8086", "10d3")
BRIDGE_CLASS = 0x0604
# Prints one line per PCI function: address vendor device class driver iommu_group,
# with "-" for a missing driver or group. It uses only shell builtins, because each
# program start in the guest reads the program over 9p under TCG (about 75 ms measured).
LIST_FUNCTIONS = r"""
cd /sys/bus/pci/devices
for address in *; do
    read -r vendor < "$address/vendor"
    read -r device < "$address/device"
    read -r class < "$address/class"
    driver=-
    group=-
    if cd -P "$address/driver" 2>/dev/null; then driver=${PWD##*/}; fi
    cd /sys/bus/pci/devices
    if cd -P "$address/iommu_group" 2>/dev/null; then group=${PWD##*/}; fi
    cd /sys/bus/pci/devices
    echo "$address $vendor $device $class $driver $group"
done
"""


@dataclass(frozen=True)
class Function:
    """One PCI function as the guest's sysfs shows it."""

    address: str
    vendor_id: str
    device_id: str
    class_code: int
    driver: str | None
    iommu_group: int | None


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("controller")
    processes = Processes(workdir)
    try:
        yield processes.start(
            "controller",
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(workdir / "state"),
            "--heartbeat-interval",
            str(HEARTBEAT_INTERVAL),
        )
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def agent_host_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def guest(start_guest: Callable[..., Guest], controller: ServerProcess, agent_host_port: int) -> Guest:
    controller_port = int(controller.address.rsplit(":", 1)[1])

    return start_guest(
        guest_forwards={GUEST_CONTROLLER_PORT: controller_port},
        host_forwards={agent_host_port: GUEST_AGENT_PORT},
    )


@pytest.fixture(scope="module")
def functions(guest: Guest) -> dict[str, Function]:
    return list_functions(guest)


def list_functions(guest: Guest) -> dict[str, Function]:
    """Read every PCI function of the guest with plain shell reads of its sysfs."""
    status, output = guest.run(LIST_FUNCTIONS)
    assert status == 0, output
    listed = {}
    for line in output.splitlines():
        address, vendor, device, class_code, driver, group = line.split()
        listed[address] = Function(
            address=address,
            vendor_id=vendor.removeprefix("0x"),
            device_id=device.removeprefix("0x"),
            class_code=int(class_code, 16),
            driver=None if driver == "-" else driver,
            iommu_group=None if group == "-" else int(group),
        )

    return listed


def find_function(functions: dict[str, Function], vendor_id: str, device_id: str) -> Function:
    matches = [f for f in functions.values() if (f.vendor_id, f.device_id) == (vendor_id, device_id)]
    assert len(matches) == 1, f"expected one {vendor_id}:{device_id} in the guest, found {functions}"

    return matches[0]


def group_members(guest: Guest, group: int) -> list[str]:
    status, output = guest.run(f"ls /sys/kernel/iommu_groups/{group}/devices")
    assert status == 0, output

    return sorted(output.split())


def read_driver(guest: Guest, address: str) -> str:
    status, output = guest.run(f"basename $(readlink /sys/bus/pci/devices/{address}/driver)")
    assert status == 0, output

    return output.strip()


def wait_for_agent(guest: Guest, channel: grpc.Channel) -> None:
    """Wait until the controller lists qemu-guest as available; fail early if the agent exits."""
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while True:
        status = guest.exit_status("agent.log")
        if status is not None:
            raise AssertionError(f"the agent in the guest exited with status {status}")
        try:
            wait_for_hosts(channel, {"qemu-guest"}, timeout=2.0)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def without_list_hosts(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if "ListHosts" not in line)


def uptime_interval_ms(output: str) -> float:
    """Return the milliseconds between the two uptime readings on the output's last line."""
    start, end = output.splitlines()[-1].split()

    return (float(end) - float(start)) * 1000


def test_guest_runs_assets_kernel(
    guest: Guest, guest_assets: GuestAssets, record_property: Callable[[str, object], None]
) -> None:
    status, output = guest.run("uname -r")

    assert status == 0, output
    assert output.strip() == guest_assets.kernel_release
    assert guest.boot_seconds > 0
    record_property("boot_s", round(guest.boot_seconds, 2))
    print(f"guest booted in {guest.boot_seconds:.2f} s")


def test_iommu_groups_present(guest: Guest) -> None:
    status, output = guest.run("ls /sys/kernel/iommu_groups")

    assert status == 0, output
    assert output.split(), f"no IOMMU groups in the guest:\n{guest.console_log()}"


def test_vfio_pci_driver_registered(guest: Guest) -> None:
    status, _ = guest.run("test -d /sys/bus/pci/drivers/vfio-pci")

    assert status == 0, f"vfio-pci is not registered:\n{guest.console_log()}"


def test_vga_bound_to_bochs(functions: dict[str, Function]) -> None:
    vga = find_function(functions, *VGA_IDS)

    assert vga.class_code == VGA_CLASS
    assert vga.driver == "bochs-drm"
    assert vga.iommu_group is not None


def test_e1000e_alone_in_group(guest: Guest, functions: dict[str, Function]) -> None:
    nic = find_function(functions, *E1000E_IDS)

    assert nic.driver == "e1000e"
    assert nic.iommu_group is not None
    members = group_members(guest, nic.iommu_group)
    endpoints = [address for address in members if functions[address].class_code >> 8 != BRIDGE_CLASS]
    assert endpoints == [nic.address]


def test_ich9_functions_share_group(functions: dict[str, Function]) -> None:
    ich9 = [f for f in functions.values() if f.address.startswith("0000:00:1f.")]

    assert len(ich9) >= 2, functions
    assert len({f.iommu_group for f in ich9}) == 1, ich9
    assert ich9[0].iommu_group is not None


def test_agent_reader_matches_sysfs(guest: Guest, functions: dict[str, Function]) -> None:
    result = guest.workdir / "reader.json"
    script = (
        "import json, sys\n"
        "from agent.sysfs import Sysfs\n"
        "sysfs = Sysfs()\n"
        "listing = {\n"
        "    'iommu_enabled': sysfs.iommu_enabled(),\n"
        "    'vfio_available': sysfs.vfio_available(),\n"
        "    'functions': [\n"
        "        [str(f.address), f.vendor_id, f.device_id, f.class_code, f.driver, f.iommu_group, f.type]\n"
        "        for f in sysfs.list_functions()\n"
        "    ],\n"
        "}\n"
        "with open(sys.argv[1], 'w') as output:\n"
        "    json.dump(listing, output)\n"
    )
    command = (
        f"cd {shlex.quote(str(REPO_ROOT))} && PYTHONPATH={shlex.quote(str(REPO_ROOT))} "
        f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} {shlex.quote(str(result))}"
    )

    status, output = guest.run(command, timeout=120)

    assert status == 0, output
    listing = json.loads(result.read_text())
    assert listing["iommu_enabled"] is True
    assert listing["vfio_available"] is True
    read = {row[0]: row for row in listing["functions"]}
    assert sorted(read) == sorted(functions)
    for address, function in functions.items():
        expected = [
            address,
            function.vendor_id,
            function.device_id,
            function.class_code,
            function.driver,
            function.iommu_group,
        ]
        assert read[address][:6] == expected
    vga = find_function(functions, *VGA_IDS)
    assert read[vga.address][6] == "gpu"


def test_agent_registers_with_controller(
    guest: Guest, controller: ServerProcess, agent_host_port: int, functions: dict[str, Function]
) -> None:
    ready_file = guest.workdir / "agent.ready.json"
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
        f"127.0.0.1:{agent_host_port}",
        "--host-name",
        "qemu-guest",
        "--log-json",
        "--ready-file",
        str(ready_file),
    ]
    root = shlex.quote(str(REPO_ROOT))
    guest.spawn(f"cd {root} && PYTHONPATH={root} exec {shlex.join(agent)}", "agent.log")
    channel = grpc.insecure_channel(controller.address)
    vga = find_function(functions, *VGA_IDS)

    try:
        wait_for_agent(guest, channel)
        hosts = hosts_pb2_grpc.HostServiceStub(channel).ListHosts(hosts_pb2.ListHostsRequest(), timeout=10)
        device = devices_pb2_grpc.DeviceServiceStub(channel).RegisterDevice(
            devices_pb2.RegisterDeviceRequest(host="qemu-guest", pci_address=vga.address), timeout=60
        )
    except (AssertionError, grpc.RpcError) as err:
        raise AssertionError(
            f"{err}\n--- agent.log ---\n{guest.read_log('agent.log')}\n"
            f"--- controller.log without ListHosts calls ---\n{without_list_hosts(controller.log())}"
        ) from err
    finally:
        channel.close()

    listed = {host.name: host for host in hosts.hosts}
    host = listed["qemu-guest"]
    assert host.available
    assert host.iommu_enabled
    assert host.vfio_available
    assert host.agent_address == f"127.0.0.1:{agent_host_port}"
    assert device.type == "gpu"
    assert device.vendor_id == VGA_IDS[0]
    assert device.device_id == VGA_IDS[1]
    assert device.pci_address == vga.address
    assert device.HasField("iommu_group")
    assert device.iommu_group == vga.iommu_group
    assert device.host == "qemu-guest"


def test_e1000e_bind_and_restore(
    guest: Guest, functions: dict[str, Function], record_property: Callable[[str, object], None]
) -> None:
    nic = find_function(functions, *E1000E_IDS)
    assert nic.iommu_group is not None
    device_dir = f"/sys/bus/pci/devices/{nic.address}"
    # Each script prints the guest's uptime before and after its writes (10 ms resolution),
    # read with the `read` builtin so that no program start falls inside the interval.
    bind = (
        "set -e; read -r start _ < /proc/uptime\n"
        f"echo vfio-pci > {device_dir}/driver_override\n"
        f"echo {nic.address} > /sys/bus/pci/drivers/e1000e/unbind\n"
        f"echo {nic.address} > /sys/bus/pci/drivers_probe\n"
        'read -r end _ < /proc/uptime; echo "$start $end"\n'
    )
    restore = (
        "set -e; read -r start _ < /proc/uptime\n"
        f"echo > {device_dir}/driver_override\n"
        # A bind that failed part way may have left the function with no driver.
        f"if [ -e /sys/bus/pci/drivers/vfio-pci/{nic.address} ]; then\n"
        f"    echo {nic.address} > /sys/bus/pci/drivers/vfio-pci/unbind\n"
        "fi\n"
        f"echo {nic.address} > /sys/bus/pci/drivers_probe\n"
        'read -r end _ < /proc/uptime; echo "$start $end"\n'
    )

    started = time.monotonic()
    bind_status, bind_output = guest.run(bind)
    try:
        assert bind_status == 0, bind_output
        assert read_driver(guest, nic.address) == "vfio-pci"
        status, output = guest.run(f"test -c /dev/vfio/{nic.iommu_group}")
        assert status == 0, f"/dev/vfio/{nic.iommu_group} is missing"
    finally:
        restore_status, restore_output = guest.run(restore)
    elapsed = time.monotonic() - started

    assert restore_status == 0, restore_output
    assert read_driver(guest, nic.address) == "e1000e"
    status, output = guest.run(f"cat {device_dir}/driver_override")
    assert status == 0, output
    assert output.strip() == "(null)"
    bind_ms = uptime_interval_ms(bind_output)
    restore_ms = uptime_interval_ms(restore_output)
    record_property("bind_ms", round(bind_ms, 1))
    record_property("restore_ms", round(restore_ms, 1))
    record_property("bind_restore_with_checks_s", round(elapsed, 2))
    print(f"e1000e bind {bind_ms:.1f} ms, restore {restore_ms:.1f} ms, with checks {elapsed:.2f} s")
