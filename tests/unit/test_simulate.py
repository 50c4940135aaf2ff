"""Tests of the simulated host kit: its tree, its kernel write semantics and its faults."""

from __future__ import annotations

import copy
import errno
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from agent.kernel import KernelWriter, SysfsWriter
from agent.main import _host_environment, build_parser
from agent.simulate import HostDescription, SimulatedHost

HOSTS_DIR = Path(__file__).resolve().parents[1] / "hosts"

BRIDGE = "0000:00:01.0"
GPU = "0000:01:00.0"
AUDIO = "0000:01:00.1"
PF = "0000:3b:00.0"
NVME = "0000:3d:00.0"
SPARE = "0000:5e:00.0"
VFS = ["0000:3b:00.2", "0000:3b:00.3", "0000:3b:00.4", "0000:3b:00.5"]


def host_dict() -> dict[str, Any]:
    """Return a small host: a GPU and its audio behind a root port, an SR-IOV NIC, a disk."""
    return {
        "host": "h1",
        "iommu": True,
        "vfio": True,
        "loaded_drivers": ["i40e"],
        "devices": [
            {
                "address": BRIDGE,
                "vendor": "8086",
                "device": "a70d",
                "class": "060400",
                "driver": "pcieport",
                "iommu_group": 1,
            },
            {
                "address": GPU,
                "vendor": "10DE",
                "device": "2684",
                "subsystem_vendor": "10de",
                "subsystem_device": "167c",
                "class": "030000",
                "revision": "a1",
                "driver": "nvidia",
                "iommu_group": 2,
                "numa_node": 0,
                "boot_vga": True,
                "serial": "b8-ce-f6-03-00-a1-b2-c3",
                "parent": BRIDGE,
                "char_devices": ["/dev/nvidia0"],
            },
            {
                "address": AUDIO,
                "vendor": "10de",
                "device": "22ba",
                "class": "040300",
                "driver": "snd_hda_intel",
                "iommu_group": 2,
                "parent": BRIDGE,
            },
            {
                "address": PF,
                "vendor": "15b3",
                "device": "101d",
                "class": "020000",
                "driver": "mlx5_core",
                "iommu_group": 3,
                "sriov": {
                    "totalvfs": 4,
                    "numvfs": 0,
                    "vf_device": "101e",
                    "first_vf": VFS[0],
                    "vf_groups": [90, 91, 92, 93],
                    "vf_driver": "mlx5_core",
                },
                "net": {
                    "interface": "eno1",
                    "default_route": True,
                    "addresses": ["192.0.2.10/24"],
                },
            },
            {
                "address": NVME,
                "vendor": "144d",
                "device": "a80a",
                "class": "010802",
                "driver": "nvme",
                "iommu_group": 4,
                "block": {"name": "nvme0n1", "mounts": ["/", "/boot/efi"]},
            },
            {
                "address": SPARE,
                "vendor": "8086",
                "device": "1572",
                "class": "020000",
                "iommu_group": 5,
            },
        ],
        "processes": [{"pid": 4242, "comm": "nvidia-persistenced", "open": ["/dev/nvidia0"]}],
    }


def build(tmp_path: Path, data: dict[str, Any] | None = None) -> SimulatedHost:
    description = HostDescription.from_dict(data if data is not None else host_dict())

    return SimulatedHost.build(description, tmp_path / "host")


@pytest.fixture
def host(tmp_path: Path) -> SimulatedHost:
    return build(tmp_path)


def write(host: SimulatedHost, relative: str, value: str) -> None:
    host.kernel.write(host.sysfs_root / relative, value)


def driver_of(host: SimulatedHost, address: str) -> str | None:
    link = host.device_path(address) / "driver"
    if not link.is_symlink():
        return None

    return os.path.basename(os.readlink(link))


def attribute(host: SimulatedHost, address: str, name: str) -> str:
    return (host.device_path(address) / name).read_text()


def device_dir(host: SimulatedHost, address: str) -> Path:
    return Path(os.path.realpath(host.device_path(address)))


def group_members(host: SimulatedHost, group: int) -> list[str]:
    devices = host.sysfs_root / "kernel" / "iommu_groups" / str(group) / "devices"

    return sorted(os.listdir(devices)) if devices.is_dir() else []


def move_to_vfio(host: SimulatedHost, address: str) -> None:
    """Bind the way the agent does: override, unbind, probe."""
    write(host, f"bus/pci/devices/{address}/driver_override", "vfio-pci\n")
    write(host, f"bus/pci/devices/{address}/driver/unbind", address)
    write(host, "bus/pci/drivers_probe", address)


# ---------------------------------------------------------------------------
# Tree layout
# ---------------------------------------------------------------------------


def test_build_creates_three_roots(host: SimulatedHost) -> None:
    assert host.sysfs_root.is_dir()
    assert host.dev_root.is_dir()
    assert host.proc_root.is_dir()
    assert host.sysfs_root == host.base / "sys"
    assert host.description.host == "h1"


def test_attribute_files_use_kernel_format(host: SimulatedHost) -> None:
    assert attribute(host, GPU, "vendor") == "0x10de\n"
    assert attribute(host, GPU, "device") == "0x2684\n"
    assert attribute(host, GPU, "subsystem_vendor") == "0x10de\n"
    assert attribute(host, GPU, "subsystem_device") == "0x167c\n"
    assert attribute(host, GPU, "class") == "0x030000\n"
    assert attribute(host, GPU, "revision") == "0xa1\n"
    assert attribute(host, GPU, "numa_node") == "0\n"
    assert attribute(host, GPU, "driver_override") == "(null)\n"
    assert attribute(host, GPU, "enable") == "1\n"
    assert attribute(host, GPU, "boot_vga") == "1\n"
    assert attribute(host, GPU, "resource0") == ""
    assert (host.device_path(GPU) / "remove").is_file()
    assert (host.device_path(GPU) / "rescan").is_file()


def test_optional_attributes_take_defaults(host: SimulatedHost) -> None:
    assert attribute(host, AUDIO, "numa_node") == "-1\n"
    assert attribute(host, AUDIO, "subsystem_vendor") == "0x0000\n"
    assert attribute(host, AUDIO, "revision") == "0x00\n"


def test_boot_vga_exists_only_for_vga_class(host: SimulatedHost) -> None:
    assert (host.device_path(GPU) / "boot_vga").exists()
    assert not (host.device_path(AUDIO) / "boot_vga").exists()
    assert not (host.device_path(NVME) / "boot_vga").exists()


def test_sriov_attributes_only_on_pf(host: SimulatedHost) -> None:
    assert attribute(host, PF, "sriov_totalvfs") == "4\n"
    assert attribute(host, PF, "sriov_numvfs") == "0\n"
    assert not (host.device_path(GPU) / "sriov_numvfs").exists()


def test_modalias_and_uevent(host: SimulatedHost) -> None:
    assert attribute(host, GPU, "modalias") == ("pci:v000010DEd00002684sv000010DEsd0000167Cbc03sc00i00\n")
    uevent = attribute(host, GPU, "uevent").splitlines()
    assert uevent[0] == "DRIVER=nvidia"
    assert "PCI_CLASS=30000" in uevent
    assert "PCI_SLOT_NAME=0000:01:00.0" in uevent
    assert not attribute(host, SPARE, "uevent").startswith("DRIVER=")


def test_device_dir_nests_under_parent_bridge(host: SimulatedHost) -> None:
    devices = host.sysfs_root / "devices"

    assert device_dir(host, BRIDGE) == devices / "pci0000:00" / BRIDGE
    assert device_dir(host, GPU) == devices / "pci0000:00" / BRIDGE / GPU
    assert device_dir(host, AUDIO) == devices / "pci0000:00" / BRIDGE / AUDIO
    assert device_dir(host, PF) == devices / "pci0000:3b" / PF


def test_links_are_relative_with_correct_depth(host: SimulatedHost) -> None:
    nested = host.device_path(GPU)
    top = host.device_path(PF)

    assert os.readlink(nested / "driver") == "../../../../bus/pci/drivers/nvidia"
    assert os.readlink(nested / "iommu_group") == "../../../../kernel/iommu_groups/2"
    assert os.readlink(nested / "subsystem") == "../../../../bus/pci"
    assert os.readlink(top / "driver") == "../../../bus/pci/drivers/mlx5_core"
    assert os.readlink(top / "iommu_group") == "../../../kernel/iommu_groups/3"
    assert os.path.realpath(nested / "driver") == str(host.sysfs_root / "bus" / "pci" / "drivers" / "nvidia")


def test_bus_devices_link_points_at_device_dir(host: SimulatedHost) -> None:
    link = host.sysfs_root / "bus" / "pci" / "devices" / GPU

    assert os.readlink(link) == "../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0"
    assert sorted(os.listdir(link.parent)) == sorted([BRIDGE, GPU, AUDIO, PF, NVME, SPARE])


def test_driver_dirs_have_kernel_files(host: SimulatedHost) -> None:
    drivers = host.sysfs_root / "bus" / "pci" / "drivers"

    assert sorted(os.listdir(drivers)) == [
        "i40e",
        "mlx5_core",
        "nvidia",
        "nvme",
        "pcieport",
        "snd_hda_intel",
        "vfio-pci",
    ]
    for name in ("bind", "unbind", "new_id", "remove_id"):
        assert (drivers / "nvidia" / name).is_file()
    assert os.path.realpath(drivers / "nvidia" / GPU) == str(device_dir(host, GPU))
    assert [entry for entry in os.listdir(drivers / "i40e") if entry.startswith("0000")] == []
    assert (host.sysfs_root / "bus" / "pci" / "drivers_probe").is_file()
    assert (host.sysfs_root / "bus" / "pci" / "rescan").is_file()


def test_unbound_device_has_no_driver_link(host: SimulatedHost) -> None:
    assert driver_of(host, SPARE) is None


def test_iommu_group_lists_members(host: SimulatedHost) -> None:
    assert group_members(host, 2) == [GPU, AUDIO]
    assert group_members(host, 1) == [BRIDGE]
    member = host.sysfs_root / "kernel" / "iommu_groups" / "2" / "devices" / AUDIO
    assert os.path.realpath(member) == str(device_dir(host, AUDIO))


def test_vfio_module_and_nodes(host: SimulatedHost) -> None:
    assert (host.sysfs_root / "module" / "vfio_pci").is_dir()
    assert os.listdir(host.dev_root / "vfio") == ["vfio"]
    assert (host.dev_root / "null").is_file()
    assert (host.dev_root / "nvidia0").is_file()


def test_class_net_and_block_resolve_to_device(host: SimulatedHost) -> None:
    net_device = host.sysfs_root / "class" / "net" / "eno1" / "device"
    block_device = host.sysfs_root / "class" / "block" / "nvme0n1" / "device"

    assert os.path.realpath(net_device) == str(device_dir(host, PF))
    assert os.path.realpath(block_device) == str(device_dir(host, NVME))
    partition = host.sysfs_root / "class" / "block" / "nvme0n1p2" / "partition"
    assert partition.read_text() == "2\n"
    assert (host.dev_root / "nvme0n1p1").is_file()


def test_proc_process_entries(host: SimulatedHost) -> None:
    process = host.proc_root / "4242"

    # The kernel keeps 15 characters of a command name.
    assert (process / "comm").read_text() == "nvidia-persiste\n"
    assert (process / "cmdline").read_text() == "nvidia-persistenced\0"
    assert os.readlink(process / "fd" / "0") == str(host.dev_root / "null")
    assert os.readlink(process / "fd" / "3") == str(host.dev_root / "nvidia0")
    assert sorted(os.listdir(process / "fd")) == ["0", "1", "2", "3"]


def test_proc_mounts_lists_partitions(host: SimulatedHost) -> None:
    lines = (host.proc_root / "mounts").read_text().splitlines()

    assert "/dev/nvme0n1p1 / ext4 rw,relatime 0 0" in lines
    assert "/dev/nvme0n1p2 /boot/efi vfat rw,relatime 0 0" in lines


def test_proc_net_route_has_default_route(host: SimulatedHost) -> None:
    lines = (host.proc_root / "net" / "route").read_text().split("\n")

    assert lines[0].startswith("Iface\tDestination\tGateway \tFlags")
    assert all(len(line) == 127 for line in lines[:-1])
    default = lines[1].split()
    assert default[:4] == ["eno1", "00000000", "010200C0", "0003"]
    assert default[7] == "00000000"
    subnet = lines[2].split()
    assert subnet[:4] == ["eno1", "000200C0", "00000000", "0001"]
    assert subnet[7] == "00FFFFFF"
    assert lines[3] == ""


def test_config_space_has_ids_and_serial(host: SimulatedHost) -> None:
    config = (host.device_path(GPU) / "config").read_bytes()

    assert len(config) == 4096
    assert struct.unpack_from("<HH", config, 0) == (0x10DE, 0x2684)
    assert struct.unpack_from("<I", config, 0x08)[0] == 0x030000A1
    header, low, high = struct.unpack_from("<III", config, 0x100)
    assert header & 0xFFFF == 0x0003
    assert (high << 32) | low == 0xB8CEF60300A1B2C3
    no_serial = (host.device_path(AUDIO) / "config").read_bytes()
    assert struct.unpack_from("<I", no_serial, 0x100)[0] == 0


def test_nvidia_information_while_bound(host: SimulatedHost) -> None:
    information = host.proc_root / "driver" / "nvidia" / "gpus" / GPU / "information"

    assert "Device Minor: \t 0\n" in information.read_text()
    assert f"Bus Location: \t {GPU}\n" in information.read_text()
    move_to_vfio(host, GPU)
    assert not information.exists()


def test_agent_reader_reads_tree(host: SimulatedHost) -> None:
    from agent.pciids import PciIds
    from agent.sysfs import Sysfs
    from devpass.pci import PciAddress

    sysfs = Sysfs(host.sysfs_root, PciIds())
    function = sysfs.read_function(PciAddress.parse(GPU))

    assert function.vendor_id == "10de"
    assert function.class_code == 0x030000
    assert function.iommu_group == 2
    assert function.driver == "nvidia"
    assert function.driver_override is None
    assert function.boot_vga is True
    assert function.serial_number == "b8cef60300a1b2c3"
    assert sysfs.iommu_enabled()
    assert sysfs.vfio_available()


def test_no_iommu_host_tree(tmp_path: Path) -> None:
    data = host_dict()
    data["iommu"] = False
    data["vfio"] = False
    for device in data["devices"]:
        device.pop("iommu_group", None)
        if "sriov" in device:
            device["sriov"].pop("vf_groups")
    host = build(tmp_path, data)

    assert os.listdir(host.sysfs_root / "kernel" / "iommu_groups") == []
    assert not (host.device_path(GPU) / "iommu_group").exists()
    assert not (host.sysfs_root / "bus" / "pci" / "drivers" / "vfio-pci").exists()
    assert not (host.sysfs_root / "module" / "vfio_pci").exists()
    assert not (host.dev_root / "vfio").exists()


def test_vmd_domain_dir_name(tmp_path: Path) -> None:
    data = host_dict()
    data["devices"].append(
        {
            "address": "10001:8a:00.0",
            "vendor": "1344",
            "device": "51c3",
            "class": "010802",
            "driver": "nvme",
            "iommu_group": 90,
        }
    )
    host = build(tmp_path, data)

    expected = host.sysfs_root / "devices" / "pci10001:8a" / "10001:8a:00.0"
    assert device_dir(host, "10001:8a:00.0") == expected


def test_build_rejects_non_empty_base(tmp_path: Path) -> None:
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "leftover").touch()

    with pytest.raises(ValueError, match="not an empty directory"):
        build(tmp_path)


# ---------------------------------------------------------------------------
# driver_override, bind, unbind, drivers_probe
# ---------------------------------------------------------------------------


def test_driver_override_sets_and_clears(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{GPU}/driver_override", "vfio-pci\n")
    assert attribute(host, GPU, "driver_override") == "vfio-pci\n"
    assert driver_of(host, GPU) == "nvidia"

    write(host, f"bus/pci/devices/{GPU}/driver_override", "\n")
    assert attribute(host, GPU, "driver_override") == "(null)\n"

    write(host, f"bus/pci/devices/{GPU}/driver_override", "vfio-pci")
    write(host, f"bus/pci/devices/{GPU}/driver_override", "")
    assert attribute(host, GPU, "driver_override") == "(null)\n"


def test_driver_override_through_resolved_dir(host: SimulatedHost) -> None:
    host.kernel.write(device_dir(host, GPU) / "driver_override", "vfio-pci")

    assert attribute(host, GPU, "driver_override") == "vfio-pci\n"


def test_driver_override_longer_than_page_einval(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{GPU}/driver_override", "x" * 5000)

    assert raised.value.errno == errno.EINVAL
    assert attribute(host, GPU, "driver_override") == "(null)\n"


def test_bind_sequence_moves_device_to_vfio(host: SimulatedHost) -> None:
    move_to_vfio(host, GPU)
    drivers = host.sysfs_root / "bus" / "pci" / "drivers"

    assert driver_of(host, GPU) == "vfio-pci"
    assert (drivers / "vfio-pci" / GPU).is_symlink()
    assert not (drivers / "nvidia" / GPU).exists()
    assert (host.dev_root / "vfio" / "2").exists()
    assert attribute(host, GPU, "uevent").startswith("DRIVER=vfio-pci\n")


def test_restore_sequence_returns_native_driver(host: SimulatedHost) -> None:
    move_to_vfio(host, GPU)
    write(host, f"bus/pci/devices/{GPU}/driver_override", "\n")
    write(host, "bus/pci/drivers/vfio-pci/unbind", GPU)
    write(host, "bus/pci/drivers_probe", GPU)

    assert driver_of(host, GPU) == "nvidia"
    assert not (host.dev_root / "vfio" / "2").exists()


def test_unbind_from_other_driver_enodev(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/vfio-pci/unbind", GPU)

    assert raised.value.errno == errno.ENODEV
    assert driver_of(host, GPU) == "nvidia"


def test_unbind_unknown_address_enodev(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/nvidia/unbind", "0000:99:00.0")

    assert raised.value.errno == errno.ENODEV


def test_bind_bound_device_ebusy(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/nvidia/bind", GPU)

    assert raised.value.errno == errno.EBUSY


def test_bind_with_other_override_enodev(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{GPU}/driver_override", "vfio-pci")
    write(host, "bus/pci/drivers/nvidia/unbind", GPU)

    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/nvidia/bind", GPU)
    assert raised.value.errno == errno.ENODEV
    assert driver_of(host, GPU) is None

    write(host, "bus/pci/drivers/vfio-pci/bind", f"{GPU}\n")
    assert driver_of(host, GPU) == "vfio-pci"


def test_cleared_override_matches_native_driver(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{GPU}/driver_override", "vfio-pci")
    write(host, f"bus/pci/devices/{GPU}/driver_override", "\n")
    write(host, "bus/pci/drivers/nvidia/unbind", GPU)
    write(host, "bus/pci/drivers/nvidia/bind", GPU)

    assert driver_of(host, GPU) == "nvidia"


def test_bind_without_override_needs_native_driver(host: SimulatedHost) -> None:
    write(host, "bus/pci/drivers/nvidia/unbind", GPU)

    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/vfio-pci/bind", GPU)
    assert raised.value.errno == errno.ENODEV

    write(host, "bus/pci/drivers/nvidia/bind", GPU)
    assert driver_of(host, GPU) == "nvidia"


def test_bind_unknown_address_enodev(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/nvidia/bind", "01:00.0")

    assert raised.value.errno == errno.ENODEV


def test_bind_to_unloaded_driver_enoent(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/nouveau/bind", GPU)

    assert raised.value.errno == errno.ENOENT


def test_vfio_bind_of_bridge_einval(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{BRIDGE}/driver_override", "vfio-pci")
    write(host, "bus/pci/drivers/pcieport/unbind", BRIDGE)

    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/vfio-pci/bind", BRIDGE)
    assert raised.value.errno == errno.EINVAL

    # drivers_probe reports success even though the probe failed.
    write(host, "bus/pci/drivers_probe", BRIDGE)
    assert driver_of(host, BRIDGE) is None


def test_drivers_probe_bound_device_is_noop(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{GPU}/driver_override", "vfio-pci")
    write(host, "bus/pci/drivers_probe", GPU)

    assert driver_of(host, GPU) == "nvidia"


def test_drivers_probe_binds_native_driver(host: SimulatedHost) -> None:
    write(host, "bus/pci/drivers/nvidia/unbind", GPU)
    write(host, "bus/pci/drivers_probe", f"{GPU}\n")

    assert driver_of(host, GPU) == "nvidia"


def test_drivers_probe_without_any_driver(host: SimulatedHost) -> None:
    write(host, "bus/pci/drivers_probe", SPARE)

    assert driver_of(host, SPARE) is None


def test_drivers_probe_override_not_loaded(tmp_path: Path) -> None:
    data = host_dict()
    data["vfio"] = False
    host = build(tmp_path, data)
    write(host, f"bus/pci/devices/{GPU}/driver_override", "vfio-pci")
    write(host, "bus/pci/drivers/nvidia/unbind", GPU)
    write(host, "bus/pci/drivers_probe", GPU)

    assert driver_of(host, GPU) is None


def test_drivers_probe_unknown_address_enodev(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers_probe", "0000:99:00.0")

    assert raised.value.errno == errno.ENODEV


@pytest.mark.parametrize("attribute_name", ["new_id", "remove_id"])
def test_dynamic_ids_rejected_loudly(host: SimulatedHost, attribute_name: str) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/drivers/vfio-pci/{attribute_name}", "10de 2684")

    assert raised.value.errno == errno.EPERM
    assert "never uses new_id" in str(raised.value)


def test_vfio_node_follows_group_binds(host: SimulatedHost) -> None:
    node = host.dev_root / "vfio" / "2"

    move_to_vfio(host, GPU)
    assert node.exists()
    move_to_vfio(host, AUDIO)
    assert node.exists()

    write(host, "bus/pci/drivers/vfio-pci/unbind", GPU)
    assert node.exists()
    write(host, "bus/pci/drivers/vfio-pci/unbind", AUDIO)
    assert not node.exists()


# ---------------------------------------------------------------------------
# SR-IOV
# ---------------------------------------------------------------------------


def test_sriov_numvfs_creates_vfs(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4\n")

    assert attribute(host, PF, "sriov_numvfs") == "4\n"
    for index, vf in enumerate(VFS):
        assert attribute(host, vf, "vendor") == "0x15b3\n"
        assert attribute(host, vf, "device") == "0x101e\n"
        assert attribute(host, vf, "class") == "0x020000\n"
        assert os.readlink(host.device_path(vf) / "physfn") == f"../{PF}"
        assert os.readlink(host.device_path(PF) / f"virtfn{index}") == f"../{vf}"
        assert group_members(host, 90 + index) == [vf]
        assert driver_of(host, vf) == "mlx5_core"
        assert device_dir(host, vf).parent == device_dir(host, PF).parent
        assert not (host.device_path(vf) / "sriov_numvfs").exists()


def test_sriov_numvfs_change_needs_zero_first(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")

    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "2")
    assert raised.value.errno == errno.EBUSY
    assert attribute(host, PF, "sriov_numvfs") == "4\n"

    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "0")
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "2")
    assert attribute(host, PF, "sriov_numvfs") == "2\n"
    assert host.device_path(VFS[1]).exists()
    assert not host.device_path(VFS[2]).exists()


def test_sriov_numvfs_above_total_erange(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "5")

    assert raised.value.errno == errno.ERANGE
    assert attribute(host, PF, "sriov_numvfs") == "0\n"


def test_sriov_numvfs_not_a_number_einval(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "four")

    assert raised.value.errno == errno.EINVAL


def test_sriov_numvfs_zero_removes_vfs(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "0")

    assert attribute(host, PF, "sriov_numvfs") == "0\n"
    for index, vf in enumerate(VFS):
        assert not os.path.lexists(host.device_path(vf))
        assert not (host.device_path(PF) / f"virtfn{index}").exists()
        assert not (host.sysfs_root / "kernel" / "iommu_groups" / str(90 + index)).exists()
        assert not (host.sysfs_root / "bus" / "pci" / "drivers" / "mlx5_core" / vf).exists()
    assert [p.name for p in device_dir(host, PF).parent.iterdir()] == [PF]


def test_sriov_numvfs_same_value_is_noop(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")

    assert attribute(host, PF, "sriov_numvfs") == "4\n"


def test_sriov_numvfs_without_pf_driver_enoent(host: SimulatedHost) -> None:
    write(host, "bus/pci/drivers/mlx5_core/unbind", PF)

    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "2")

    assert raised.value.errno == errno.ENOENT


def test_sriov_numvfs_on_non_pf_enoent(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{GPU}/sriov_numvfs", "1")

    assert raised.value.errno == errno.ENOENT


def test_vfs_unbound_when_vf_driver_not_loaded(tmp_path: Path) -> None:
    data = host_dict()
    data["devices"][3]["sriov"]["vf_driver"] = "iavf"
    host = build(tmp_path, data)
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "1")

    assert host.device_path(VFS[0]).exists()
    assert driver_of(host, VFS[0]) is None


def test_vfs_present_at_boot(tmp_path: Path) -> None:
    data = host_dict()
    data["devices"][3]["sriov"]["numvfs"] = 2
    host = build(tmp_path, data)

    assert attribute(host, PF, "sriov_numvfs") == "2\n"
    assert host.device_path(VFS[1]).exists()
    assert not host.device_path(VFS[2]).exists()


def test_vf_binds_to_vfio_while_pf_stays(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")
    move_to_vfio(host, VFS[0])

    assert driver_of(host, VFS[0]) == "vfio-pci"
    assert driver_of(host, PF) == "mlx5_core"
    assert (host.dev_root / "vfio" / "90").exists()


def test_vfio_rejects_pf_with_vfs(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")
    write(host, f"bus/pci/devices/{PF}/driver_override", "vfio-pci")
    write(host, "bus/pci/drivers/mlx5_core/unbind", PF)

    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/vfio-pci/bind", PF)

    assert raised.value.errno == errno.EBUSY
    assert driver_of(host, PF) is None


def test_vf_addresses_spill_into_next_device() -> None:
    description = HostDescription.from_dict(host_dict())
    sriov = description.device(PF).sriov
    assert sriov is not None

    assert sriov.vf_address(5) == "0000:3b:00.7"
    assert sriov.vf_address(6) == "0000:3b:01.0"


# ---------------------------------------------------------------------------
# remove and rescan
# ---------------------------------------------------------------------------


def test_remove_takes_device_out_of_tree(host: SimulatedHost) -> None:
    old_dir = device_dir(host, GPU)
    write(host, f"bus/pci/devices/{GPU}/remove", "1")

    assert not old_dir.exists()
    assert not os.path.lexists(host.device_path(GPU))
    assert not (host.sysfs_root / "bus" / "pci" / "drivers" / "nvidia" / GPU).exists()
    assert group_members(host, 2) == [AUDIO]


def test_rescan_restores_removed_device(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{GPU}/driver_override", "vfio-pci")
    write(host, f"bus/pci/devices/{GPU}/remove", "1")
    write(host, "bus/pci/rescan", "1")

    assert driver_of(host, GPU) == "nvidia"
    assert attribute(host, GPU, "driver_override") == "(null)\n"
    assert group_members(host, 2) == [GPU, AUDIO]


def test_remove_bridge_removes_children(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{BRIDGE}/remove", "1")

    for address in (BRIDGE, GPU, AUDIO):
        assert not os.path.lexists(host.device_path(address))
    assert not (host.sysfs_root / "kernel" / "iommu_groups" / "2").exists()

    write(host, "bus/pci/rescan", "1")
    assert device_dir(host, AUDIO).parent == device_dir(host, BRIDGE)


def test_remove_pf_removes_vfs(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")
    write(host, f"bus/pci/devices/{PF}/remove", "1")

    for vf in VFS:
        assert not os.path.lexists(host.device_path(vf))
    assert not (host.sysfs_root / "class" / "net" / "eno1").exists()

    write(host, "bus/pci/rescan", "1")
    assert attribute(host, PF, "sriov_numvfs") == "0\n"
    assert (host.sysfs_root / "class" / "net" / "eno1").is_symlink()


def test_remove_zero_is_noop(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{GPU}/remove", "0")

    assert host.device_path(GPU).exists()


def test_remove_invalid_value_einval(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{GPU}/remove", "yes")

    assert raised.value.errno == errno.EINVAL


def test_device_rescan_restores_bus_siblings(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{AUDIO}/remove", "1")
    write(host, f"bus/pci/devices/{NVME}/remove", "1")
    write(host, f"bus/pci/devices/{GPU}/rescan", "1")

    assert driver_of(host, AUDIO) == "snd_hda_intel"
    assert not os.path.lexists(host.device_path(NVME))


def test_removed_vfio_device_drops_group_node(host: SimulatedHost) -> None:
    move_to_vfio(host, GPU)
    write(host, f"bus/pci/devices/{GPU}/remove", "1")

    assert not (host.dev_root / "vfio" / "2").exists()


# ---------------------------------------------------------------------------
# Reopening a tree that an earlier process built
# ---------------------------------------------------------------------------


def change_state(host: SimulatedHost) -> None:
    """Leave the host as a killed agent might: GPU on vfio-pci, AUDIO mid-bind, NVMe removed, VFs on."""
    move_to_vfio(host, GPU)
    # AUDIO stops after the unbind: override set, no driver, the probe still to come.
    write(host, f"bus/pci/devices/{AUDIO}/driver_override", "vfio-pci\n")
    write(host, "bus/pci/drivers/snd_hda_intel/unbind", AUDIO)
    write(host, f"bus/pci/devices/{NVME}/remove", "1")
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")
    move_to_vfio(host, VFS[0])


@pytest.fixture
def reopened(host: SimulatedHost) -> SimulatedHost:
    change_state(host)

    return SimulatedHost.reopen(host.description, host.base)


def test_reopen_leaves_tree_unchanged(host: SimulatedHost) -> None:
    change_state(host)
    before = tree_snapshot(host)

    reopened = SimulatedHost.reopen(host.description, host.base)

    assert reopened.base == host.base
    assert reopened.sysfs_root == host.sysfs_root
    assert tree_snapshot(reopened) == before
    assert reopened.kernel.writes == []


def test_reopen_reads_drivers_from_links(reopened: SimulatedHost) -> None:
    assert driver_of(reopened, BRIDGE) == "pcieport"
    assert driver_of(reopened, GPU) == "vfio-pci"
    assert driver_of(reopened, AUDIO) is None
    assert driver_of(reopened, PF) == "mlx5_core"
    assert driver_of(reopened, VFS[0]) == "vfio-pci"
    assert driver_of(reopened, SPARE) is None
    for vf in VFS[1:]:
        assert driver_of(reopened, vf) == "mlx5_core"


def test_reopen_keeps_vfio_nodes(reopened: SimulatedHost) -> None:
    assert (reopened.dev_root / "vfio" / "2").exists()
    assert (reopened.dev_root / "vfio" / "90").exists()
    assert not (reopened.dev_root / "vfio" / "91").exists()
    assert not (reopened.dev_root / "vfio" / "4").exists()


def test_reopen_finishes_pending_probe(reopened: SimulatedHost) -> None:
    # The probe uses the override that the earlier process wrote, read back from the tree.
    write(reopened, "bus/pci/drivers_probe", AUDIO)

    assert driver_of(reopened, AUDIO) == "vfio-pci"
    assert attribute(reopened, AUDIO, "driver_override") == "vfio-pci\n"


def test_reopen_restores_bound_device(reopened: SimulatedHost) -> None:
    write(reopened, f"bus/pci/devices/{GPU}/driver_override", "\n")
    write(reopened, "bus/pci/drivers/vfio-pci/unbind", GPU)
    write(reopened, "bus/pci/drivers_probe", GPU)

    assert driver_of(reopened, GPU) == "nvidia"
    assert attribute(reopened, GPU, "driver_override") == "(null)\n"
    assert "DRIVER=nvidia\n" in attribute(reopened, GPU, "uevent")
    assert (reopened.sysfs_root / "bus" / "pci" / "drivers" / "nvidia" / GPU).is_symlink()
    assert not (reopened.sysfs_root / "bus" / "pci" / "drivers" / "vfio-pci" / GPU).exists()
    # AUDIO, the other member of group 2, has no driver, so the group's node goes.
    assert not (reopened.dev_root / "vfio" / "2").exists()


def test_reopen_keeps_removed_device_removed(reopened: SimulatedHost) -> None:
    assert not os.path.lexists(reopened.device_path(NVME))
    assert group_members(reopened, 4) == []
    with pytest.raises(OSError) as raised:
        write(reopened, "bus/pci/drivers_probe", NVME)
    assert raised.value.errno == errno.ENODEV

    write(reopened, "bus/pci/rescan", "1")

    assert driver_of(reopened, NVME) == "nvme"
    assert (reopened.sysfs_root / "class" / "block" / "nvme0n1").is_symlink()


def test_reopen_keeps_enabled_vfs(reopened: SimulatedHost) -> None:
    assert attribute(reopened, PF, "sriov_numvfs") == "4\n"
    for vf in VFS:
        assert reopened.device_path(vf).exists()

    # A different non-zero count is rejected only while the kernel has 4 VFs enabled.
    with pytest.raises(OSError) as raised:
        write(reopened, f"bus/pci/devices/{PF}/sriov_numvfs", "2")
    assert raised.value.errno == errno.EBUSY

    write(reopened, f"bus/pci/devices/{PF}/sriov_numvfs", "0")

    for vf in VFS:
        assert not os.path.lexists(reopened.device_path(vf))
    assert not (reopened.dev_root / "vfio" / "90").exists()


def test_reopen_twice_keeps_state(reopened: SimulatedHost) -> None:
    write(reopened, "bus/pci/drivers_probe", AUDIO)

    again = SimulatedHost.reopen(reopened.description, reopened.base)

    assert driver_of(again, AUDIO) == "vfio-pci"
    assert driver_of(again, GPU) == "vfio-pci"
    write(again, "bus/pci/drivers/vfio-pci/unbind", AUDIO)
    assert driver_of(again, AUDIO) is None


def test_reopen_finishes_interrupted_bind(host: SimulatedHost) -> None:
    """A kill after the attach created the function's driver link, before the rest."""
    move_to_vfio(host, GPU)
    (host.sysfs_root / "bus" / "pci" / "drivers" / "vfio-pci" / GPU).unlink()
    (host.dev_root / "vfio" / "2").unlink()
    (device_dir(host, GPU) / "uevent").write_text((device_dir(host, AUDIO) / "uevent").read_text())

    reopened = SimulatedHost.reopen(host.description, host.base)

    assert (reopened.sysfs_root / "bus" / "pci" / "drivers" / "vfio-pci" / GPU).is_symlink()
    assert "DRIVER=vfio-pci\n" in attribute(reopened, GPU, "uevent")
    assert (reopened.dev_root / "vfio" / "2").exists()
    assert not (reopened.proc_root / "driver" / "nvidia" / "gpus" / GPU).exists()


def test_reopen_finishes_interrupted_unbind(host: SimulatedHost) -> None:
    """A kill after the detach removed the function's driver link, before the rest."""
    move_to_vfio(host, GPU)
    (device_dir(host, GPU) / "driver").unlink()

    reopened = SimulatedHost.reopen(host.description, host.base)

    assert driver_of(reopened, GPU) is None
    assert not os.path.lexists(reopened.sysfs_root / "bus" / "pci" / "drivers" / "vfio-pci" / GPU)
    assert "DRIVER=" not in attribute(reopened, GPU, "uevent")
    assert not (reopened.dev_root / "vfio" / "2").exists()


def test_reopen_rejects_directory_without_tree(tmp_path: Path) -> None:
    (tmp_path / "host" / "sys").mkdir(parents=True)
    description = HostDescription.from_dict(host_dict())

    with pytest.raises(ValueError, match="missing directories dev, proc"):
        SimulatedHost.reopen(description, tmp_path / "host")


def test_reopen_rejects_other_drivers(host: SimulatedHost) -> None:
    data = host_dict()
    data["loaded_drivers"] = []
    other = HostDescription.from_dict(data)

    with pytest.raises(ValueError, match="another description"):
        SimulatedHost.reopen(other, host.base)


def test_reopen_rejects_undescribed_function(host: SimulatedHost) -> None:
    data = host_dict()
    data["devices"] = [device for device in data["devices"] if device["address"] != SPARE]
    other = HostDescription.from_dict(data)

    with pytest.raises(ValueError, match=f"{SPARE}, but host h1 describes no such function"):
        SimulatedHost.reopen(other, host.base)


def test_reopen_rejects_vf_count_mismatch(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{PF}/sriov_numvfs", "4")
    # As if the process died after removing the VFs, before it wrote the new count.
    (device_dir(host, PF) / "sriov_numvfs").write_text("2\n")

    with pytest.raises(ValueError, match="killed mid-change"):
        SimulatedHost.reopen(host.description, host.base)


@pytest.fixture
def default_logging() -> Iterator[None]:
    """Undo the structlog set-up that the agent's start-up code makes in this process."""
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("default_logging")
def test_agent_environment_reopens_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    description_file = tmp_path / "h1.yaml"
    description_file.write_text(yaml.safe_dump(host_dict()))
    arguments = ["--simulate", str(description_file), "--simulate-dir", str(tmp_path / "sim"), "--log-json"]

    first = _host_environment(build_parser().parse_args(arguments))
    first.writer.write(first.sysfs_root / "bus" / "pci" / "devices" / NVME / "remove", "1")
    first_log = capsys.readouterr().err
    second = _host_environment(build_parser().parse_args(arguments))
    second_log = capsys.readouterr().err

    assert '"event": "simulated_host_built"' in first_log
    assert '"event": "simulated_host_reopened"' in second_log
    assert second.sysfs_root == first.sysfs_root
    assert second.journal_path == tmp_path / "sim" / "state" / "journal.json"
    assert not os.path.lexists(second.sysfs_root / "bus" / "pci" / "devices" / NVME)


# ---------------------------------------------------------------------------
# Paths the kernel rejects
# ---------------------------------------------------------------------------


def test_missing_attribute_enoent(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{GPU}/no_such_attribute", "1")

    assert raised.value.errno == errno.ENOENT
    assert not (host.device_path(GPU) / "no_such_attribute").exists()


def test_read_only_attribute_eacces(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{GPU}/vendor", "0x8086")

    assert raised.value.errno == errno.EACCES
    assert attribute(host, GPU, "vendor") == "0x10de\n"


def test_directory_eisdir(host: SimulatedHost) -> None:
    with pytest.raises(OSError) as raised:
        write(host, f"bus/pci/devices/{GPU}/driver", "x")

    assert raised.value.errno == errno.EISDIR


def test_path_outside_root_rejected(host: SimulatedHost) -> None:
    with pytest.raises(ValueError, match="outside the simulated sysfs root"):
        host.kernel.write(host.dev_root / "null", "1")

    with pytest.raises(ValueError):
        write(host, "../proc/mounts", "x")
    assert host.kernel.writes == []


def test_writes_record_every_attempt(host: SimulatedHost) -> None:
    write(host, f"bus/pci/devices/{GPU}/driver_override", "vfio-pci\n")
    with pytest.raises(OSError):
        write(host, "bus/pci/drivers/vfio-pci/unbind", GPU)

    assert host.kernel.writes == [
        (f"bus/pci/devices/{GPU}/driver_override", "vfio-pci\n"),
        ("bus/pci/drivers/vfio-pci/unbind", GPU),
    ]


def test_simulated_kernel_is_a_kernel_writer(host: SimulatedHost) -> None:
    writer: KernelWriter = host.kernel
    writer.write(host.device_path(GPU) / "driver_override", "vfio-pci")

    assert attribute(host, GPU, "driver_override") == "vfio-pci\n"


# ---------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------


FAULT_WRITES = {
    "driver_override": (f"bus/pci/devices/{GPU}/driver_override", "vfio-pci"),
    "unbind": ("bus/pci/drivers/nvidia/unbind", GPU),
    "bind": ("bus/pci/drivers/nvidia/bind", GPU),
    "drivers_probe": ("bus/pci/drivers_probe", GPU),
    "sriov_numvfs": (f"bus/pci/devices/{PF}/sriov_numvfs", "4"),
    "remove": (f"bus/pci/devices/{GPU}/remove", "1"),
}


def tree_snapshot(host: SimulatedHost) -> list[tuple[str, str]]:
    """List every path under the sysfs and dev roots with its link target or content."""
    entries = []
    for root in (host.sysfs_root, host.dev_root):
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                entries.append((str(path), os.readlink(path)))
            elif path.is_file() and path.stat().st_mode & 0o444:
                entries.append((str(path), path.read_bytes().hex()))
            else:
                entries.append((str(path), ""))

    return entries


@pytest.mark.parametrize("attribute_name", sorted(FAULT_WRITES))
@pytest.mark.parametrize("error", ["EBUSY", "ENODEV"])
def test_fault_raises_without_state_change(host: SimulatedHost, attribute_name: str, error: str) -> None:
    relative, value = FAULT_WRITES[attribute_name]
    before = tree_snapshot(host)
    host.kernel.inject_fault(attribute_name, error)  # type: ignore[arg-type]

    with pytest.raises(OSError) as raised:
        write(host, relative, value)

    assert raised.value.errno == getattr(errno, error)
    assert tree_snapshot(host) == before
    assert host.kernel.writes == [(relative, value)]


def test_fault_fires_given_number_of_times(host: SimulatedHost) -> None:
    host.kernel.inject_fault("unbind", "EBUSY", times=2)

    for _ in range(2):
        with pytest.raises(OSError):
            write(host, "bus/pci/drivers/nvidia/unbind", GPU)
    write(host, "bus/pci/drivers/nvidia/unbind", GPU)

    assert driver_of(host, GPU) is None


def test_fault_matches_address_and_driver(host: SimulatedHost) -> None:
    host.kernel.inject_fault("unbind", "ENODEV", address=AUDIO)
    host.kernel.inject_fault("bind", "ENODEV", driver="vfio-pci")

    write(host, "bus/pci/drivers/nvidia/unbind", GPU)
    write(host, "bus/pci/drivers/nvidia/bind", GPU)
    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers/snd_hda_intel/unbind", AUDIO)

    assert raised.value.errno == errno.ENODEV
    assert driver_of(host, GPU) == "nvidia"
    assert driver_of(host, AUDIO) == "snd_hda_intel"


def test_clear_faults_removes_pending(host: SimulatedHost) -> None:
    host.kernel.inject_fault("unbind", "EBUSY")
    host.kernel.clear_faults()
    write(host, "bus/pci/drivers/nvidia/unbind", GPU)

    assert driver_of(host, GPU) is None


def test_inject_fault_rejects_bad_arguments(host: SimulatedHost) -> None:
    with pytest.raises(ValueError, match="cannot inject"):
        host.kernel.inject_fault("new_id", "EBUSY")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown fault"):
        host.kernel.inject_fault("bind", "EIO")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        host.kernel.inject_fault("bind", "EBUSY", times=0)
    with pytest.raises(ValueError, match="names no driver"):
        host.kernel.inject_fault("remove", "EBUSY", driver="nvidia")


def start_write(host: SimulatedHost, relative: str, value: str) -> tuple[threading.Thread, list[OSError]]:
    errors: list[OSError] = []

    def run() -> None:
        try:
            write(host, relative, value)
        except OSError as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    return thread, errors


def test_hang_blocks_until_released(host: SimulatedHost) -> None:
    host.kernel.inject_fault("unbind", "HANG", address=GPU)
    thread, errors = start_write(host, "bus/pci/drivers/nvidia/unbind", GPU)

    assert host.kernel.wait_for_hangs(1, timeout=5)
    assert host.kernel.hanging_writes == 1
    thread.join(timeout=0.2)
    assert thread.is_alive()

    host.kernel.release_hangs()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert errors[0].errno == errno.EINTR
    assert driver_of(host, GPU) == "nvidia"
    assert host.kernel.hanging_writes == 0


def test_hang_does_not_block_other_writes(host: SimulatedHost) -> None:
    host.kernel.inject_fault("unbind", "HANG")
    thread, _ = start_write(host, "bus/pci/drivers/nvidia/unbind", GPU)
    assert host.kernel.wait_for_hangs(1, timeout=5)

    write(host, f"bus/pci/devices/{AUDIO}/driver_override", "vfio-pci")
    assert attribute(host, AUDIO, "driver_override") == "vfio-pci\n"

    host.kernel.release_hangs()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_unreleased_hang_ends_after_timeout(host: SimulatedHost) -> None:
    host.kernel.hang_timeout = 0.05
    host.kernel.inject_fault("drivers_probe", "HANG")

    with pytest.raises(OSError) as raised:
        write(host, "bus/pci/drivers_probe", GPU)

    assert raised.value.errno == errno.EINTR
    assert "not released" in str(raised.value)


# ---------------------------------------------------------------------------
# Host descriptions
# ---------------------------------------------------------------------------


HOST_FILES = sorted(HOSTS_DIR.glob("*.yaml"))


def test_host_files_exist() -> None:
    names = {path.name for path in HOST_FILES}

    for required in (
        "hgx-h100.yaml",
        "l4.yaml",
        "no-iommu.yaml",
        "two-hosts-a.yaml",
        "two-hosts-b.yaml",
        "workstation.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", HOST_FILES, ids=lambda path: path.name)
def test_host_file_loads_and_builds(path: Path, tmp_path: Path) -> None:
    description = HostDescription.from_yaml(path)
    host = SimulatedHost.build(description, tmp_path / "host")

    present = sorted(os.listdir(host.sysfs_root / "bus" / "pci" / "devices"))
    assert present == sorted(device.address for device in description.devices)
    for device in description.devices:
        assert driver_of(host, device.address) == device.driver
    assert "/" in [line.split()[1] for line in (host.proc_root / "mounts").read_text().splitlines()]
    route = (host.proc_root / "net" / "route").read_text().splitlines()
    assert any(line.split()[1] == "00000000" for line in route[1:])


def test_hgx_topology(tmp_path: Path) -> None:
    description = HostDescription.from_yaml(HOSTS_DIR / "hgx-h100.yaml")
    host = SimulatedHost.build(description, tmp_path / "host")
    gpus = [d for d in description.devices if (d.vendor, d.device) == ("10de", "2330")]

    assert description.host == "hgx-h100-01"
    assert [gpu.address[5:7] for gpu in gpus] == ["18", "2a", "3a", "5d", "9a", "ab", "ba", "db"]
    assert sorted(gpu.numa_node for gpu in gpus) == [0, 0, 0, 0, 1, 1, 1, 1]
    for gpu in gpus:
        assert group_members(host, gpu.iommu_group or -1) == [gpu.address]
        assert attribute(host, gpu.address, "subsystem_device") == "0x16c1\n"
        bridge = description.device(gpu.parent or "")
        assert bridge.class_code == "060400"
        assert device_dir(host, gpu.address).parent == device_dir(host, bridge.address)
    assert len([d for d in description.devices if d.device == "22a3"]) == 4
    assert len([d for d in description.devices if d.device == "1021"]) == 8
    assert group_members(host, 60) == ["0000:4c:00.0", "0000:4c:00.1"]
    assert os.path.realpath(host.sysfs_root / "class" / "net" / "eno1" / "device") == str(
        device_dir(host, "0000:4c:00.0")
    )


def test_workstation_group_shares_gpu_audio_bridge(tmp_path: Path) -> None:
    host = SimulatedHost.build(HostDescription.from_yaml(HOSTS_DIR / "workstation.yaml"), tmp_path)

    assert host.description.host == "ws-01"
    assert group_members(host, 12) == ["0000:00:01.0", "0000:01:00.0", "0000:01:00.1"]
    assert attribute(host, "0000:01:00.0", "boot_vga") == "1\n"


def test_l4_host_has_vmd_domain(tmp_path: Path) -> None:
    host = SimulatedHost.build(HostDescription.from_yaml(HOSTS_DIR / "l4.yaml"), tmp_path)

    assert host.description.host == "l4-01"
    assert group_members(host, 82) == ["0000:a2:00.0"]
    assert group_members(host, 90) == ["10001:8a:00.0"]
    assert device_dir(host, "10001:8a:00.0").parent.name == "pci10001:8a"


def test_no_iommu_host_has_no_groups(tmp_path: Path) -> None:
    host = SimulatedHost.build(HostDescription.from_yaml(HOSTS_DIR / "no-iommu.yaml"), tmp_path)

    assert host.description.host == "noiommu-01"
    assert os.listdir(host.sysfs_root / "kernel" / "iommu_groups") == []
    assert not (host.sysfs_root / "bus" / "pci" / "drivers" / "vfio-pci").exists()


def test_two_hosts_share_gpu_address(tmp_path: Path) -> None:
    node_a = HostDescription.from_yaml(HOSTS_DIR / "two-hosts-a.yaml")
    node_b = HostDescription.from_yaml(HOSTS_DIR / "two-hosts-b.yaml")
    host_b = SimulatedHost.build(node_b, tmp_path / "b")

    assert (node_a.host, node_b.host) == ("node-a", "node-b")
    assert node_a.device("0000:a2:00.0").iommu_group == 82
    assert node_b.device("0000:a2:00.0").iommu_group == 83
    assert node_a.device("0000:c1:00.0").device == "27b8"
    assert group_members(host_b, 85) == ["0000:c1:00.0", "0000:c1:00.1"]


def test_from_yaml_names_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("host: [unclosed\n")

    with pytest.raises(ValueError, match=r"broken\.yaml: invalid YAML"):
        HostDescription.from_yaml(path)


def test_from_yaml_reports_unquoted_class(tmp_path: Path) -> None:
    path = tmp_path / "unquoted.yaml"
    path.write_text(
        "host: h1\niommu: false\nvfio: false\ndevices:\n"
        '  - {address: "0000:01:00.0", vendor: "10de", device: "2684", class: 030000}\n'
    )

    with pytest.raises(ValueError) as raised:
        HostDescription.from_yaml(path)

    message = str(raised.value)
    assert "unquoted.yaml" in message
    assert "device 0000:01:00.0" in message
    assert "field 'class'" in message
    assert "in quotes" in message


def broken(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(host_dict())
    change(data)

    return data


INVALID_DESCRIPTIONS = [
    ("missing host", broken(lambda d: d.pop("host")), "missing required field 'host'"),
    ("unknown field", broken(lambda d: d["devices"][1].update(colour="red")), "unknown field colour"),
    (
        "bad address",
        broken(lambda d: d["devices"][1].update(address="0000:01:00.9")),
        "devices[1], field 'address'",
    ),
    (
        "non-canonical address",
        broken(lambda d: d["devices"][1].update(address="01:00.0")),
        "canonical form '0000:01:00.0'",
    ),
    (
        "short vendor",
        broken(lambda d: d["devices"][1].update(vendor="10d")),
        "device 0000:01:00.0: field 'vendor' must be 4 hex digits",
    ),
    (
        "missing group",
        broken(lambda d: d["devices"][2].pop("iommu_group")),
        "device 0000:01:00.1: missing required field 'iommu_group'",
    ),
    (
        "group without iommu",
        broken(lambda d: d.update(iommu=False)),
        "IOMMU groups are given but iommu is false",
    ),
    (
        "boot_vga on audio",
        broken(lambda d: d["devices"][2].update(boot_vga=True)),
        "device 0000:01:00.1: field 'boot_vga' applies only to VGA class",
    ),
    (
        "unknown parent",
        broken(lambda d: d["devices"][1].update(parent="0000:00:02.0")),
        "parent 0000:00:02.0 is not a described device",
    ),
    (
        "parent not a bridge",
        broken(lambda d: d["devices"][2].update(parent=GPU)),
        "not a PCI bridge",
    ),
    (
        "duplicate address",
        broken(lambda d: d["devices"][2].update(address=GPU)),
        "duplicate device address 0000:01:00.0",
    ),
    (
        "vf groups too short",
        broken(lambda d: d["devices"][3]["sriov"].update(vf_groups=[90])),
        "one group for each of the 4 VFs, got 1",
    ),
    (
        "numvfs above totalvfs",
        broken(lambda d: d["devices"][3]["sriov"].update(numvfs=5)),
        "field 'numvfs' must be at most totalvfs (4)",
    ),
    (
        "vf overlaps device",
        broken(lambda d: d["devices"][3]["sriov"].update(first_vf="0000:3d:00.0")),
        "VF address 0000:3d:00.0 is also a described device",
    ),
    (
        "vfio-pci without vfio",
        broken(lambda d: (d.update(vfio=False), d["devices"][1].update(driver="vfio-pci"))),
        "bound to vfio-pci but vfio is false",
    ),
    (
        "numa node as text",
        broken(lambda d: d["devices"][1].update(numa_node="0")),
        "field 'numa_node' must be an integer of at least -1",
    ),
    (
        "bad serial",
        broken(lambda d: d["devices"][1].update(serial="xyz")),
        "field 'serial' must be 16 hex digits",
    ),
    (
        "char device outside dev",
        broken(lambda d: d["devices"][1].update(char_devices=["/tmp/nvidia0"])),
        "'/tmp/nvidia0' is not a path under /dev",
    ),
    (
        "duplicate interface",
        broken(lambda d: d["devices"][5].update(net={"interface": "eno1"})),
        "duplicate network interface eno1",
    ),
    (
        "bad address in route",
        broken(lambda d: d["devices"][3]["net"].update(addresses=["192.0.2.300/24"])),
        "net, field 'addresses'",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"),
    [(data, message) for _, data, message in INVALID_DESCRIPTIONS],
    ids=[name for name, _, _ in INVALID_DESCRIPTIONS],
)
def test_invalid_description_rejected(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        HostDescription.from_dict(data)

    assert message in str(raised.value)


def test_description_normalises_hex_case() -> None:
    description = HostDescription.from_dict(host_dict())

    assert description.device(GPU).vendor == "10de"
    assert description.device(GPU).serial == "b8cef60300a1b2c3"


def test_description_drivers_include_vfio_and_loaded() -> None:
    description = HostDescription.from_dict(host_dict())

    assert description.drivers == frozenset(
        {"pcieport", "nvidia", "snd_hda_intel", "mlx5_core", "nvme", "i40e", "vfio-pci"}
    )


# ---------------------------------------------------------------------------
# SysfsWriter, on a temporary directory only
# ---------------------------------------------------------------------------


@pytest.fixture
def fake_sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    device = root / "devices" / "pci0000:00" / GPU
    device.mkdir(parents=True)
    (device / "driver_override").write_text("(null)\n")
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    (root / "bus" / "pci" / "devices" / GPU).symlink_to(f"../../../devices/pci0000:00/{GPU}")

    return root


def test_sysfs_writer_writes_whole_value_once(fake_sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        calls.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr("agent.kernel.os.write", counting_write)
    writer: KernelWriter = SysfsWriter(fake_sysfs)
    target = fake_sysfs / "bus" / "pci" / "devices" / GPU / "driver_override"
    writer.write(target, "vfio-pci\n")

    assert calls == [b"vfio-pci\n"]
    assert target.read_text() == "vfio-pci\n"


def test_sysfs_writer_rejects_path_outside_root(fake_sysfs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep\n")
    (fake_sysfs / "escape").symlink_to(outside)
    writer = SysfsWriter(fake_sysfs)

    with pytest.raises(ValueError, match="outside the sysfs root"):
        writer.write(fake_sysfs / "escape" / "victim", "1")
    with pytest.raises(ValueError):
        writer.write(fake_sysfs / ".." / "outside" / "victim", "1")
    assert (outside / "victim").read_text() == "keep\n"


def test_sysfs_writer_does_not_follow_final_link(fake_sysfs: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (fake_sysfs / "link").symlink_to(victim)

    with pytest.raises(OSError) as raised:
        SysfsWriter(fake_sysfs).write(fake_sysfs / "link", "1")

    assert raised.value.errno == errno.ELOOP
    assert victim.read_text() == "keep\n"


def test_sysfs_writer_does_not_create_files(fake_sysfs: Path) -> None:
    target = fake_sysfs / "bus" / "pci" / "drivers_probe"

    with pytest.raises(FileNotFoundError):
        SysfsWriter(fake_sysfs).write(target, GPU)
    assert not target.exists()
