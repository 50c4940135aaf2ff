"""HostUsageScanner on simulated hosts, and read-only on this machine's real /sys and /proc."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.simulate import HostDescription, SimulatedHost
from agent.usage import CriticalUse, Holder, HostUsageScanner
from devpass.pci import PciAddress
from tests.conftest import HOSTS_DIR

NVME = PciAddress.parse("0000:01:00.0")
NVME2 = PciAddress.parse("0000:02:00.0")
NIC = PciAddress.parse("0000:04:00.0")
NIC2 = PciAddress.parse("0000:04:00.1")
GPU = PciAddress.parse("0000:41:00.0")


def build(tmp_path: Path, description: HostDescription) -> SimulatedHost:
    return SimulatedHost.build(description, tmp_path / "host")


def from_file(tmp_path: Path, name: str, **changes: Any) -> SimulatedHost:
    description = HostDescription.from_yaml(HOSTS_DIR / name)
    return build(tmp_path, dataclasses.replace(description, **changes))


def scanner(host: SimulatedHost, controller_host: str | None = None) -> HostUsageScanner:
    return HostUsageScanner(host.sysfs_root, host.proc_root, host.dev_root, controller_host=controller_host)


def kinds(uses: list[CriticalUse]) -> list[str]:
    return [use.kind for use in uses]


def base_host() -> dict[str, Any]:
    """Return a host with a default-route NIC (eno1), a spare NIC (eno2) and a root NVMe drive."""
    return {
        "host": "h1",
        "iommu": True,
        "vfio": True,
        "devices": [
            {
                "address": str(NIC),
                "vendor": "8086",
                "device": "1521",
                "class": "020000",
                "driver": "igb",
                "iommu_group": 30,
                "net": {"interface": "eno1", "default_route": True, "addresses": ["192.0.2.10/24"]},
            },
            {
                "address": str(NIC2),
                "vendor": "8086",
                "device": "1521",
                "class": "020000",
                "driver": "igb",
                "iommu_group": 31,
                "net": {"interface": "eno2"},
            },
            {
                "address": str(NVME),
                "vendor": "144d",
                "device": "a80a",
                "class": "010802",
                "driver": "nvme",
                "iommu_group": 20,
                "block": {"name": "nvme0n1", "mounts": ["/", "/boot/efi"]},
            },
        ],
    }


def with_changes(**changes: Any) -> HostDescription:
    data = copy.deepcopy(base_host())
    data.update(changes)
    return HostDescription.from_dict(data)


def device_entry(data: dict[str, Any], address: PciAddress) -> dict[str, Any]:
    return next(d for d in data["devices"] if d["address"] == str(address))


def gpu(**fields: Any) -> dict[str, Any]:
    return {
        "address": str(GPU),
        "vendor": "10de",
        "device": "2331",
        "class": "030200",
        "driver": "nvidia",
        "iommu_group": 12,
        "char_devices": ["/dev/nvidia0"],
        **fields,
    }


# ---------------------------------------------------------------------------
# Mounted file systems and swap
# ---------------------------------------------------------------------------


def test_root_disk_mounts_are_critical(tmp_path: Path) -> None:
    host = from_file(tmp_path, "busy-holders.yaml")

    assert scanner(host).critical_uses(NVME) == [
        CriticalUse("mounted_filesystem", "/ is mounted from /dev/nvme0n1p1"),
        CriticalUse("mounted_filesystem", "/boot/efi is mounted from /dev/nvme0n1p2"),
    ]


def test_unmounted_data_disk_not_critical(tmp_path: Path) -> None:
    host = from_file(tmp_path, "bind-fails-rollback.yaml")

    assert scanner(host).critical_uses(PciAddress.parse("0000:86:00.0")) == []
    assert kinds(scanner(host).critical_uses(NVME)) == ["mounted_filesystem", "mounted_filesystem"]


def test_mount_through_device_mapper(tmp_path: Path) -> None:
    data = base_host()
    device_entry(data, NVME)["block"] = {"name": "nvme0n1", "mounts": ["/boot/efi"], "partitions": 2}
    data["virtual_block_devices"] = [
        {"name": "dm-0", "kind": "dm", "dm_name": "vg0-root", "slaves": ["nvme0n1p2"], "mounts": ["/"]}
    ]
    host = build(tmp_path, HostDescription.from_dict(data))

    assert scanner(host).critical_uses(NVME) == [
        CriticalUse("mounted_filesystem", "/boot/efi is mounted from /dev/nvme0n1p1"),
        CriticalUse("mounted_filesystem", "/ is mounted from /dev/mapper/vg0-root"),
    ]


def test_mount_through_md_and_dm_stack(tmp_path: Path) -> None:
    data = base_host()
    data["devices"].append(
        {
            "address": str(NVME2),
            "vendor": "144d",
            "device": "a80a",
            "class": "010802",
            "driver": "nvme",
            "iommu_group": 21,
            "block": {"name": "nvme1n1", "partitions": 1},
        }
    )
    device_entry(data, NVME)["block"] = {"name": "nvme0n1", "mounts": ["/", "/boot/efi"], "partitions": 3}
    # /data is LVM on a RAID 1 of nvme0n1p3 and nvme1n1p1: dm-1 over md0 over two partitions.
    data["virtual_block_devices"] = [
        {"name": "md0", "kind": "md", "slaves": ["nvme0n1p3", "nvme1n1p1"]},
        {"name": "dm-1", "kind": "dm", "dm_name": "data-lv", "slaves": ["md0"], "mounts": ["/data"]},
    ]
    host = build(tmp_path, HostDescription.from_dict(data))
    usage = scanner(host)

    assert usage.critical_uses(NVME2) == [
        CriticalUse("mounted_filesystem", "/data is mounted from /dev/mapper/data-lv")
    ]
    assert CriticalUse("mounted_filesystem", "/data is mounted from /dev/mapper/data-lv") in (
        usage.critical_uses(NVME)
    )


def test_dev_root_resolved_through_cmdline(tmp_path: Path) -> None:
    host = from_file(
        tmp_path, "busy-holders.yaml", root_mount_source="/dev/root", cmdline="ro root=/dev/nvme0n1p1 quiet"
    )

    assert scanner(host).critical_uses(NVME)[0] == CriticalUse(
        "mounted_filesystem", "/ is mounted from /dev/root (/dev/nvme0n1p1)"
    )


def test_dev_root_by_partuuid_link(tmp_path: Path) -> None:
    host = from_file(
        tmp_path, "busy-holders.yaml", root_mount_source="/dev/root", cmdline="root=PARTUUID=5e1f-01 ro"
    )
    link = host.dev_root / "disk" / "by-partuuid" / "5e1f-01"
    link.parent.mkdir(parents=True)
    link.symlink_to("../../nvme0n1p1")

    assert scanner(host).critical_uses(NVME)[0] == CriticalUse(
        "mounted_filesystem", "/ is mounted from /dev/root (/dev/disk/by-partuuid/5e1f-01)"
    )


@pytest.mark.parametrize("cmdline", ["ro quiet", "root=PARTUUID=0000-01 ro", "root=259:1"])
def test_dev_root_unresolvable(tmp_path: Path, cmdline: str) -> None:
    host = from_file(tmp_path, "busy-holders.yaml", root_mount_source="/dev/root", cmdline=cmdline)

    # Only /boot/efi can be traced to its disk.
    assert scanner(host).critical_uses(NVME) == [
        CriticalUse("mounted_filesystem", "/boot/efi is mounted from /dev/nvme0n1p2")
    ]


def test_mount_point_with_space(tmp_path: Path) -> None:
    host = from_file(tmp_path, "bind-fails-rollback.yaml")
    (host.dev_root / "nvme1n1").touch()
    with (host.proc_root / "mounts").open("a") as mounts:
        mounts.write("/dev/nvme1n1 /srv/vm\\040images xfs rw 0 0\n")

    assert scanner(host).critical_uses(PciAddress.parse("0000:86:00.0")) == [
        CriticalUse("mounted_filesystem", "/srv/vm images is mounted from /dev/nvme1n1")
    ]


def test_swap_partition_is_critical(tmp_path: Path) -> None:
    data = base_host()
    device_entry(data, NVME)["block"] = {"name": "nvme0n1", "mounts": ["/", "/boot/efi"], "partitions": 3}
    data["swaps"] = ["/dev/nvme0n1p3"]
    host = build(tmp_path, HostDescription.from_dict(data))

    uses = scanner(host).critical_uses(NVME)

    assert kinds(uses) == ["mounted_filesystem", "mounted_filesystem", "swap"]
    assert uses[2].detail == "/dev/nvme0n1p3 is an active swap partition"
    assert scanner(host).critical_uses(NIC2) == []


# ---------------------------------------------------------------------------
# Default route and the controller's traffic
# ---------------------------------------------------------------------------


def test_default_route_nic_is_critical(tmp_path: Path) -> None:
    host = from_file(tmp_path, "busy-holders.yaml")

    assert scanner(host).critical_uses(NIC) == [
        CriticalUse("default_route", "the IPv4 default route goes through eno1")
    ]
    assert scanner(host).critical_uses(GPU) == []


def test_group_sibling_without_address(tmp_path: Path) -> None:
    host = from_file(tmp_path, "group-sibling-mgmt-nic.yaml")

    assert kinds(scanner(host).critical_uses(PciAddress.parse("0000:02:00.0"))) == ["default_route"]
    assert scanner(host).critical_uses(PciAddress.parse("0000:02:00.1")) == []


def test_default_route_through_bridge_and_bond(tmp_path: Path) -> None:
    host = from_file(tmp_path, "bridged-nic.yaml")

    assert scanner(host).critical_uses(NIC) == [
        CriticalUse("default_route", "the IPv4 default route goes through br0 on eno1")
    ]
    assert scanner(host).critical_uses(NIC2) == []


def test_default_route_through_vlan(tmp_path: Path) -> None:
    data = base_host()
    device_entry(data, NIC)["net"] = {"interface": "eno1"}
    data["virtual_interfaces"] = [
        {
            "name": "eno1.100",
            "kind": "vlan",
            "lower": ["eno1"],
            "default_route": True,
            "addresses": ["192.0.2.10/24"],
        }
    ]
    host = build(tmp_path, HostDescription.from_dict(data))

    assert scanner(host).critical_uses(NIC) == [
        CriticalUse("default_route", "the IPv4 default route goes through eno1.100 on eno1")
    ]
    assert scanner(host).critical_uses(NIC2) == []


def test_bond_with_two_slaves(tmp_path: Path) -> None:
    data = base_host()
    device_entry(data, NIC)["net"] = {"interface": "eno1", "master": "bond0"}
    device_entry(data, NIC2)["net"] = {"interface": "eno2", "master": "bond0"}
    data["virtual_interfaces"] = [
        {"name": "bond0", "kind": "bond", "default_route": True, "addresses": ["192.0.2.10/24"]}
    ]
    host = build(tmp_path, HostDescription.from_dict(data))

    assert (host.sysfs_root / "class" / "net" / "bond0" / "bonding" / "slaves").read_text() == "eno1 eno2\n"
    assert scanner(host).critical_uses(NIC) == [
        CriticalUse("default_route", "the IPv4 default route goes through bond0 on eno1")
    ]
    assert scanner(host).critical_uses(NIC2) == [
        CriticalUse("default_route", "the IPv4 default route goes through bond0 on eno2")
    ]


def test_ipv6_default_route(tmp_path: Path) -> None:
    data = base_host()
    device_entry(data, NIC)["net"] = {"interface": "eno1", "addresses": ["192.0.2.10/24"]}
    device_entry(data, NIC2)["net"] = {
        "interface": "eno2",
        "default_route": True,
        "addresses": ["2001:db8:0:1::10/64"],
    }
    host = build(tmp_path, HostDescription.from_dict(data))

    assert scanner(host).critical_uses(NIC2) == [
        CriticalUse("default_route", "the IPv6 default route goes through eno2")
    ]
    assert scanner(host).critical_uses(NIC) == []


def test_no_route_files(tmp_path: Path) -> None:
    host = from_file(tmp_path, "busy-holders.yaml")
    (host.proc_root / "net" / "route").unlink()
    (host.proc_root / "net" / "ipv6_route").unlink()

    assert scanner(host, controller_host="192.0.2.200").critical_uses(NIC) == []


def controller_host_description() -> HostDescription:
    """Return the base host with eno2 on 198.51.100.0/24, which has no default route."""
    data = base_host()
    device_entry(data, NIC2)["net"] = {"interface": "eno2", "addresses": ["198.51.100.10/24"]}
    return HostDescription.from_dict(data)


def test_agent_traffic_longest_prefix(tmp_path: Path) -> None:
    host = build(tmp_path, controller_host_description())
    usage = scanner(host, controller_host="198.51.100.7")

    assert usage.critical_uses(NIC2) == [
        CriticalUse("agent_traffic", "traffic to the controller 198.51.100.7 goes through eno2")
    ]
    assert kinds(usage.critical_uses(NIC)) == ["default_route"]


def test_agent_traffic_by_default_route(tmp_path: Path) -> None:
    host = build(tmp_path, controller_host_description())
    usage = scanner(host, controller_host="203.0.113.5")

    assert usage.critical_uses(NIC) == [
        CriticalUse("default_route", "the IPv4 default route goes through eno1"),
        CriticalUse("agent_traffic", "traffic to the controller 203.0.113.5 goes through eno1"),
    ]
    assert usage.critical_uses(NIC2) == []


def test_agent_traffic_through_bridge(tmp_path: Path) -> None:
    host = from_file(tmp_path, "bridged-nic.yaml")
    usage = scanner(host, controller_host="192.0.2.200")

    assert usage.critical_uses(NIC)[1] == CriticalUse(
        "agent_traffic", "traffic to the controller 192.0.2.200 goes through br0 on eno1"
    )


@pytest.mark.parametrize("controller", ["127.0.0.1", "[::1]", "localhost"])
def test_loopback_controller_no_traffic(tmp_path: Path, controller: str) -> None:
    host = build(tmp_path, controller_host_description())
    usage = scanner(host, controller_host=controller)

    assert kinds(usage.critical_uses(NIC)) == ["default_route"]
    assert usage.critical_uses(NIC2) == []


def test_controller_name_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []

    def getaddrinfo(host: str, port: object, **kwargs: object) -> list[tuple[Any, ...]]:
        looked_up.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("198.51.100.7", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    host = build(tmp_path, controller_host_description())
    usage = scanner(host, controller_host="controller.example")

    assert usage.critical_uses(NIC2) == [
        CriticalUse(
            "agent_traffic",
            "traffic to the controller controller.example (198.51.100.7) goes through eno2",
        )
    ]
    usage.critical_uses(NIC)
    assert looked_up == ["controller.example"]


def test_controller_name_unresolvable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(host: str, port: object, **kwargs: object) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    host = build(tmp_path, controller_host_description())
    usage = scanner(host, controller_host="missing.example")

    assert kinds(usage.critical_uses(NIC)) == ["default_route"]
    assert usage.critical_uses(NIC2) == []


# ---------------------------------------------------------------------------
# Boot console
# ---------------------------------------------------------------------------

FB_GPU = PciAddress.parse("0000:21:00.0")
DRM_GPU = PciAddress.parse("0000:61:00.0")


def test_console_on_framebuffer_is_critical(tmp_path: Path) -> None:
    host = from_file(tmp_path, "bridged-nic.yaml")

    assert scanner(host).critical_uses(FB_GPU) == [
        CriticalUse("boot_console", "the kernel console on tty0 is shown on this boot VGA device (fb0)")
    ]
    assert scanner(host).critical_uses(DRM_GPU) == [
        CriticalUse("boot_console", "the kernel console on tty0 is shown on this boot VGA device (card0)")
    ]


def test_serial_console_boot_vga_not_critical(tmp_path: Path) -> None:
    host = from_file(tmp_path, "bridged-nic.yaml", consoles=("ttyS0",))

    assert (host.proc_root / "consoles").read_text() == "ttyS0                -W- (EC  p a)    4:64\n"
    assert scanner(host).critical_uses(FB_GPU) == []
    assert scanner(host).critical_uses(DRM_GPU) == []


def test_qemu_guest_vga_not_critical(tmp_path: Path) -> None:
    host = from_file(tmp_path, "gpu-audio-group.yaml")
    usage = scanner(host)

    assert usage.critical_uses(PciAddress.parse("0000:01:00.0")) == []
    assert usage.critical_uses(PciAddress.parse("0000:01:00.1")) == []


def test_boot_vga_without_display_not_critical(tmp_path: Path) -> None:
    host = from_file(tmp_path, "workstation.yaml", consoles=("tty0",))

    assert (host.sysfs_root / "bus" / "pci" / "devices" / "0000:01:00.0" / "boot_vga").read_text() == "1\n"
    assert scanner(host).critical_uses(PciAddress.parse("0000:01:00.0")) == []


def test_framebuffer_without_boot_vga_not_critical(tmp_path: Path) -> None:
    data = base_host()
    data["consoles"] = ["tty0"]
    data["devices"].append(gpu(address=str(FB_GPU), **{"class": "030000"}, boot_vga=False, framebuffer=True))
    host = build(tmp_path, HostDescription.from_dict(data))

    assert scanner(host).critical_uses(FB_GPU) == []


def test_console_gone_after_vfio_bind(tmp_path: Path) -> None:
    host = from_file(tmp_path, "bridged-nic.yaml")
    device = host.device_path(str(FB_GPU))
    host.kernel.write(device / "driver_override", "vfio-pci")
    host.kernel.write(device / "driver" / "unbind", str(FB_GPU))
    host.kernel.write(host.sysfs_root / "bus" / "pci" / "drivers_probe", str(FB_GPU))

    assert os.readlink(device / "driver").endswith("/vfio-pci")
    assert not (host.sysfs_root / "class" / "graphics" / "fb0").exists()
    assert scanner(host).critical_uses(FB_GPU) == []


# ---------------------------------------------------------------------------
# Holders
# ---------------------------------------------------------------------------


def test_holders_of_nvidia_node(tmp_path: Path) -> None:
    host = from_file(tmp_path, "busy-holders.yaml")

    # comm keeps 15 characters, so the full name comes from argv[0].
    assert (host.proc_root / "2001" / "comm").read_text() == "nvidia-persiste\n"
    assert scanner(host).holders(GPU) == [
        Holder(pid=2001, command="nvidia-persistenced", path="/dev/nvidia0"),
        Holder(pid=2002, command="dcgm-exporter", path="/dev/nvidia0"),
    ]


def test_no_holders_on_idle_device(tmp_path: Path) -> None:
    host = from_file(tmp_path, "busy-holders.yaml")

    assert scanner(host).holders(NIC) == []
    assert scanner(host).holders(NVME) == []


def test_vanished_pid_skipped(tmp_path: Path) -> None:
    host = from_file(tmp_path, "busy-holders.yaml")
    shutil.rmtree(host.proc_root / "2001")
    # A process that exits while it is read leaves its directory without an fd directory.
    (host.proc_root / "2003").mkdir()

    assert scanner(host).holders(GPU) == [Holder(pid=2002, command="dcgm-exporter", path="/dev/nvidia0")]


def test_holder_of_resource_file(tmp_path: Path) -> None:
    data = base_host()
    data["devices"].append(gpu())
    data["processes"] = [
        {"pid": 3001, "comm": "gpu-burn", "open": [f"/sys/bus/pci/devices/{GPU}/resource0"]},
        {"pid": 3002, "comm": "lspci", "open": [f"/sys/bus/pci/devices/{GPU}/config"]},
        {"pid": 3003, "comm": "cat", "open": [f"/sys/bus/pci/devices/{GPU}/vendor"]},
    ]
    host = build(tmp_path, HostDescription.from_dict(data))

    target = os.readlink(host.proc_root / "3001" / "fd" / "3")
    assert target == f"{host.sysfs_root}/devices/pci0000:41/{GPU}/resource0"
    assert scanner(host).holders(GPU) == [
        Holder(pid=3001, command="gpu-burn", path=f"/sys/devices/pci0000:41/{GPU}/resource0"),
        Holder(pid=3002, command="lspci", path=f"/sys/devices/pci0000:41/{GPU}/config"),
    ]


def test_holders_of_drm_and_vfio_nodes(tmp_path: Path) -> None:
    data = base_host()
    data["devices"].append(gpu(**{"class": "030000"}, drm=True))
    data["processes"] = [
        {"pid": 4001, "comm": "Xorg", "open": ["/dev/dri/card0"]},
        {"pid": 4002, "comm": "ollama", "open": ["/dev/dri/renderD128", "/dev/nvidia0"]},
        {"pid": 4003, "comm": "qemu-system-x86", "open": ["/dev/vfio/vfio", "/dev/vfio/12"]},
        {"pid": 4004, "comm": "sshd", "open": ["/dev/vfio/vfio"]},
    ]
    host = build(tmp_path, HostDescription.from_dict(data))

    assert scanner(host).holders(GPU) == [
        Holder(pid=4001, command="Xorg", path="/dev/dri/card0"),
        Holder(pid=4002, command="ollama", path="/dev/dri/renderD128"),
        Holder(pid=4002, command="ollama", path="/dev/nvidia0"),
        Holder(pid=4003, command="qemu-system-x86", path="/dev/vfio/12"),
    ]


# ---------------------------------------------------------------------------
# Host description keys added for these tests
# ---------------------------------------------------------------------------


def nic_changes(address: PciAddress, net: dict[str, Any]) -> dict[str, Any]:
    data = base_host()
    device_entry(data, address)["net"] = net
    return data


INVALID_DESCRIPTIONS = [
    (
        nic_changes(NIC, {"interface": "eno1", "master": "br9"}),
        "interface eno1: master br9 is not a bridge or bond in virtual_interfaces",
    ),
    (
        {**base_host(), "virtual_interfaces": [{"name": "v1", "kind": "vlan", "lower": ["eno1", "eno2"]}]},
        "virtual interface v1: field 'lower' must be a list of exactly one interface for a VLAN",
    ),
    (
        {**base_host(), "virtual_interfaces": [{"name": "br0", "kind": "bridge", "lower": ["eno7"]}]},
        "virtual interface br0: lower interface eno7 is not described",
    ),
    (
        {
            **base_host(),
            "virtual_interfaces": [
                {"name": "br0", "kind": "bridge", "lower": ["bond0"]},
                {"name": "bond0", "kind": "bond", "lower": ["br0"]},
            ],
        },
        "virtual interfaces stack in a loop at",
    ),
    (
        {
            **base_host(),
            "virtual_interfaces": [
                {"name": "br0", "kind": "bridge", "lower": ["eno1"]},
                {"name": "bond0", "kind": "bond", "lower": ["eno1"]},
            ],
        },
        "interface is a port of two bridges or bonds: eno1",
    ),
    (
        {**base_host(), "virtual_interfaces": [{"name": "eno1", "kind": "bridge"}]},
        "duplicate network interface eno1",
    ),
    (
        {**base_host(), "virtual_block_devices": [{"name": "dm-0", "kind": "dm", "slaves": ["sdz1"]}]},
        "virtual block device dm-0: slave sdz1 is not described",
    ),
    (
        {**base_host(), "virtual_block_devices": [{"name": "md0", "kind": "dm", "slaves": ["nvme0n1p1"]}]},
        "field 'name' must be dm-N for kind dm",
    ),
    (
        {**base_host(), "swaps": ["/dev/nvme0n1p9"]},
        "field 'swaps': /dev/nvme0n1p9 is not a described block device",
    ),
    ({**base_host(), "consoles": ["serial"]}, "field 'consoles' must be a list of console names"),
    ({**base_host(), "cmdline": 7}, "field 'cmdline' must be a kernel command line on one line"),
    (
        {**base_host(), "root_mount_source": "/dev/root", "devices": base_host()["devices"][:2]},
        "root_mount_source is set but no block device mounts /",
    ),
    (
        {**base_host(), "devices": [*base_host()["devices"][:2], {**base_host()["devices"][2], "drm": True}]},
        "field 'drm' applies only to display controllers (class 03xxxx), not class 010802",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"), [pytest.param(data, message, id=message) for data, message in INVALID_DESCRIPTIONS]
)
def test_invalid_description_rejected(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        HostDescription.from_dict(data)

    assert message in str(raised.value)


def test_description_defaults() -> None:
    description = HostDescription.from_dict(base_host())

    assert description.consoles == ("ttyS0",)
    assert description.cmdline == "root=/dev/nvme0n1p1 ro console=ttyS0"
    assert description.virtual_interfaces == ()
    assert description.swaps == ()


def test_proc_files_of_description(tmp_path: Path) -> None:
    data = base_host()
    data["consoles"] = ["ttyS1", "tty0"]
    data["cmdline"] = "root=/dev/nvme0n1p1 console=tty0 console=ttyS1,115200"
    host = build(tmp_path, HostDescription.from_dict(data))

    assert (host.proc_root / "consoles").read_text() == (
        "ttyS1                -W- (EC  p a)    4:65\ntty0                 -WU (E   p  )    4:1\n"
    )
    assert (
        host.proc_root / "cmdline"
    ).read_text() == "root=/dev/nvme0n1p1 console=tty0 console=ttyS1,115200\n"


# ---------------------------------------------------------------------------
# This machine, read only
# ---------------------------------------------------------------------------

REAL_SYS = Path("/sys")
_ADDRESS = re.compile(r"^[0-9a-f]{4,5}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def real_scanner() -> HostUsageScanner:
    return HostUsageScanner(REAL_SYS, Path("/proc"), Path("/dev"))


def real_functions() -> list[PciAddress]:
    devices = REAL_SYS / "bus" / "pci" / "devices"
    if not devices.is_dir() or not os.listdir(devices):
        pytest.skip("this machine has no PCI functions in /sys")
    return [PciAddress.parse(name) for name in sorted(os.listdir(devices))]


def function_in_path(path: str) -> PciAddress | None:
    """Return the last PCI address component of a resolved sysfs path."""
    addresses = [part for part in Path(path).parts if _ADDRESS.match(part)]
    return PciAddress.parse(addresses[-1]) if addresses else None


def root_function() -> PciAddress:
    """Find the function under / through the device number of its file system."""
    number = os.stat("/").st_dev
    link = REAL_SYS / "dev" / "block" / f"{os.major(number)}:{os.minor(number)}"
    function = function_in_path(os.path.realpath(link)) if link.exists() else None
    if function is None:
        pytest.skip("the root file system of this machine is not on a PCI block device")
    return function


def default_route_function() -> PciAddress:
    """Find the function whose net/<interface> directory is the IPv4 default route's interface."""
    lines = Path("/proc/net/route").read_text().splitlines()[1:]
    interfaces = {line.split()[0] for line in lines if line.split()[1] == "00000000"}
    for address in real_functions():
        device_dir = REAL_SYS / "bus" / "pci" / "devices" / str(address)
        names = {path.name for pattern in ("net/*", "*/net/*") for path in device_dir.glob(pattern)}
        if names & interfaces:
            return address
    pytest.skip("no PCI network function carries this machine's IPv4 default route")


def has_block_or_net(address: PciAddress) -> bool:
    device_dir = REAL_SYS / "bus" / "pci" / "devices" / str(address)
    patterns = ("block/*", "*/block/*", "net/*", "*/net/*", "*/*/block/*")
    return any(next(device_dir.glob(pattern), None) is not None for pattern in patterns)


@pytest.mark.realsys
def test_real_host_scan_all_functions() -> None:
    usage = real_scanner()
    for address in real_functions():
        uses = usage.critical_uses(address)
        holders = usage.holders(address)

        assert all(isinstance(use, CriticalUse) for use in uses)
        assert [holder.pid for holder in holders] == sorted(holder.pid for holder in holders)
        boot_vga = REAL_SYS / "bus" / "pci" / "devices" / str(address) / "boot_vga"
        if not has_block_or_net(address) and not boot_vga.exists():
            assert uses == [], address


@pytest.mark.realsys
def test_real_root_disk_critical() -> None:
    function = root_function()

    uses = real_scanner().critical_uses(function)

    root_uses = [use for use in uses if use.detail.startswith("/ is mounted from /dev/")]
    assert [use.kind for use in root_uses] == ["mounted_filesystem"]


@pytest.mark.realsys
def test_real_default_route_nic_critical() -> None:
    function = default_route_function()

    uses = real_scanner().critical_uses(function)

    assert any(
        use.kind == "default_route" and use.detail.startswith("the IPv4 default route goes through")
        for use in uses
    ), uses


@pytest.mark.realsys
def test_real_holder_of_config_file() -> None:
    function = root_function()
    config = REAL_SYS / "bus" / "pci" / "devices" / str(function) / "config"
    child = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(config)!r}, 'rb'); print('open', flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "open\n"
        with config.open("rb"):
            holders = real_scanner().holders(function)
        command = Path(f"/proc/{child.pid}/comm").read_text().strip()
    finally:
        child.kill()
        child.wait()

    assert [h for h in holders if h.pid == child.pid] == [
        Holder(pid=child.pid, command=command, path=os.path.realpath(config))
    ]
    # The scanner leaves out its own process, which has the same file open.
    assert os.getpid() not in [holder.pid for holder in holders]
