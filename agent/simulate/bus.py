"""The simulated PCI bus: present functions, their sysfs entries, driver links and VFs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, cast

from agent.simulate.devices import VFIO_DRIVER, DeviceDescription
from agent.simulate.display import _sync_display
from agent.simulate.files import (
    _attributes,
    _ipv6_route_table,
    _nvidia_minor,
    _route_table,
    _symlink,
    _uevent,
    _write_file,
)
from agent.simulate.stacks import _add_virtual_block_device, _add_virtual_interface, _lowest_first
from devpass.pci import PciAddress

if TYPE_CHECKING:
    from agent.simulate.tree import SimulatedHost


@dataclass
class _LiveDevice:
    """Kernel state of one present PCI function, mutable because binds change it."""

    spec: DeviceDescription
    directory: PurePosixPath
    physfn: str | None = None
    driver: str | None = None
    driver_override: str | None = None
    numvfs: int = 0


class _PciBus:
    """The part of the kernel that keeps the sysfs tree in step with its PCI functions.

    ``SimulatedKernel`` extends it with the write path. Its methods run under the kernel's lock,
    or while the kernel boots, before any write.
    """

    def __init__(self, host: SimulatedHost) -> None:
        self._host = host
        self._root = host.sysfs_root
        self._devices: dict[str, _LiveDevice] = {}
        self._directories: dict[PurePosixPath, str] = {}

    # Driver links -----------------------------------------------------------

    def _attach(self, device: _LiveDevice, driver: str) -> None:
        device_dir = self._root / device.directory
        driver_dir = self._root / "bus" / "pci" / "drivers" / driver
        _symlink(device_dir / "driver", driver_dir)
        _symlink(driver_dir / device.spec.address, device_dir)
        device.driver = driver
        self._write_attribute(device, "uevent", _uevent(device.spec, driver))
        self._sync_vfio_node(device.spec.iommu_group)
        self._sync_nvidia_information(device)
        self._sync_display(device)

    def _detach(self, device: _LiveDevice) -> None:
        driver_dir = self._root / "bus" / "pci" / "drivers" / cast(str, device.driver)
        (self._root / device.directory / "driver").unlink()
        (driver_dir / device.spec.address).unlink()
        device.driver = None
        self._write_attribute(device, "uevent", _uevent(device.spec, None))
        self._sync_vfio_node(device.spec.iommu_group)
        self._sync_nvidia_information(device)
        self._sync_display(device)

    def _sync_vfio_node(self, group: int | None) -> None:
        """Keep /dev/vfio/<group> present exactly while a member is bound to vfio-pci."""
        if group is None:
            return

        node = self._host.dev_root / "vfio" / str(group)
        in_use = any(d.spec.iommu_group == group and d.driver == VFIO_DRIVER for d in self._devices.values())
        if in_use:
            node.parent.mkdir(exist_ok=True)
            node.touch()
        else:
            node.unlink(missing_ok=True)

    def _sync_nvidia_information(self, device: _LiveDevice) -> None:
        """Keep the NVIDIA driver's /proc/driver/nvidia/gpus/<address> entry in step.

        The driver creates the entry while it is bound. Its Device Minor is the N of
        /dev/nvidiaN, so a reader can map that node back to the PCI function.
        """
        gpu_dir = self._host.proc_root / "driver" / "nvidia" / "gpus" / device.spec.address
        minor = _nvidia_minor(device.spec)
        if device.driver != "nvidia" or minor is None:
            shutil.rmtree(gpu_dir, ignore_errors=True)
            return

        gpu_dir.mkdir(parents=True, exist_ok=True)
        (gpu_dir / "information").write_text(
            "Bus Type: \t PCIe\n"
            f"Bus Location: \t {device.spec.address}\n"
            f"Device Minor: \t {minor}\n"
            "GPU Excluded:\t No\n"
        )

    def _sync_display(self, device: _LiveDevice) -> None:
        devices = self._host.description.devices
        device_dir = self._root / device.directory
        _sync_display(self._root, self._host.dev_root, devices, device_dir, device.spec, device.driver)

    # Adding and removing functions -----------------------------------------

    def _boot(self) -> None:
        for directory in (
            "devices",
            "bus/pci/devices",
            "bus/pci/drivers",
            "kernel/iommu_groups",
            "class/net",
            "class/block",
            "class/graphics",
            "class/drm",
            "block",
            "module",
        ):
            (self._root / directory).mkdir(parents=True)
        _write_file(self._root / "bus" / "pci" / "drivers_probe", "", 0o200)
        _write_file(self._root / "bus" / "pci" / "rescan", "", 0o200)

        description = self._host.description
        for driver in sorted(description.drivers):
            self._add_driver(driver)
        if description.iommu:
            # The DMA remapping unit (Intel VT-d) that provides the IOMMU groups.
            iommu_dir = self._root / "devices" / "virtual" / "iommu" / "dmar0"
            iommu_dir.mkdir(parents=True)
            (self._root / "class" / "iommu").mkdir()
            _symlink(self._root / "class" / "iommu" / "dmar0", iommu_dir)

        for spec in _parents_first(description.devices):
            device = self._add_device(spec, physfn=None)
            if spec.sriov is not None and spec.sriov.numvfs > 0:
                self._enable_vfs(device, spec.sriov.numvfs)
        self._add_virtual_devices()
        self._write_route_table()

    def _adopt(self, devices: Iterable[_LiveDevice]) -> None:
        """Take over functions that an earlier kernel left in the tree, instead of booting.

        Each function's ``driver`` link is the record of its driver, because attaching
        creates it first and detaching removes it first. The entries that follow from it
        (the driver directory's link, uevent, the /dev/vfio node, the NVIDIA /proc entry
        and the display entries) are brought in step, which finishes an attach or detach
        that a kill interrupted.
        """
        for device in devices:
            self._devices[device.spec.address] = device
            self._directories[device.directory] = device.spec.address
        for device in self._devices.values():
            self._sync_driver_entries(device)

    def _sync_driver_entries(self, device: _LiveDevice) -> None:
        address = device.spec.address
        for driver_dir in (self._root / "bus" / "pci" / "drivers").iterdir():
            link = driver_dir / address
            if driver_dir.name != device.driver:
                link.unlink(missing_ok=True)
            elif not link.is_symlink():
                _symlink(link, self._root / device.directory)

        uevent = _uevent(device.spec, device.driver)
        if (self._root / device.directory / "uevent").read_text() != uevent:
            self._write_attribute(device, "uevent", uevent)
        self._sync_vfio_node(device.spec.iommu_group)
        self._sync_nvidia_information(device)
        self._sync_display(device)

    def _add_virtual_devices(self) -> None:
        """Stack the bridges, bonds, VLANs, dm and md disks on the functions' own, lowest first."""
        description = self._host.description
        interfaces = {v.name: v for v in description.virtual_interfaces}
        lower = {name: description.lower_interfaces(v) for name, v in interfaces.items()}
        for name in _lowest_first(lower):
            _add_virtual_interface(self._root, interfaces[name], lower[name])

        disks = {v.name: v for v in description.virtual_block_devices}
        for name in _lowest_first({name: disk.slaves for name, disk in disks.items()}):
            _add_virtual_block_device(self._root, disks[name])

    def _add_driver(self, name: str) -> None:
        driver_dir = self._root / "bus" / "pci" / "drivers" / name
        driver_dir.mkdir()
        for attribute in ("bind", "unbind", "new_id", "remove_id", "uevent"):
            _write_file(driver_dir / attribute, "", 0o200)

        if name == VFIO_DRIVER:
            module_dir = self._root / "module" / "vfio_pci"
            (module_dir / "parameters").mkdir(parents=True)
            _symlink(driver_dir / "module", module_dir)

    def _add_device(self, spec: DeviceDescription, physfn: str | None) -> _LiveDevice:
        directory = self._directory_for(spec)
        device = _LiveDevice(spec=spec, directory=directory, physfn=physfn)
        device_dir = self._root / directory
        device_dir.mkdir(parents=True)
        for name, (content, mode) in _attributes(spec).items():
            _write_file(device_dir / name, content, mode)

        _symlink(device_dir / "subsystem", self._root / "bus" / "pci")
        _symlink(self._root / "bus" / "pci" / "devices" / spec.address, device_dir)
        if spec.iommu_group is not None:
            group_dir = self._root / "kernel" / "iommu_groups" / str(spec.iommu_group)
            (group_dir / "devices").mkdir(parents=True, exist_ok=True)
            _symlink(group_dir / "devices" / spec.address, device_dir)
            _symlink(device_dir / "iommu_group", group_dir)
        self._add_net_and_block(spec, device_dir)

        self._devices[spec.address] = device
        self._directories[directory] = spec.address
        if spec.driver is not None and spec.driver in self._host.description.drivers:
            self._attach(device, spec.driver)

        return device

    def _directory_for(self, spec: DeviceDescription) -> PurePosixPath:
        if spec.parent is not None:
            return self._devices[spec.parent].directory / spec.address

        address = PciAddress.parse(spec.address)
        return PurePosixPath("devices", f"pci{address.domain:04x}:{address.bus:02x}", spec.address)

    def _add_net_and_block(self, spec: DeviceDescription, device_dir: Path) -> None:
        if spec.net is not None:
            interface_dir = device_dir / "net" / spec.net.interface
            interface_dir.mkdir(parents=True)
            _symlink(interface_dir / "device", device_dir)
            _symlink(self._root / "class" / "net" / spec.net.interface, interface_dir)

        if spec.block is not None:
            # NOTE: on a real host the disk's `device` link leads to a device below the
            # PCI function, such as nvme0 or a SCSI target. Here it leads to the function.
            # Walking up the resolved /sys/class/block/<name> finds the function in both.
            disk_dir = device_dir / "block" / spec.block.name
            disk_dir.mkdir(parents=True)
            _symlink(disk_dir / "device", device_dir)
            _symlink(self._root / "class" / "block" / spec.block.name, disk_dir)
            _symlink(self._root / "block" / spec.block.name, disk_dir)
            for number, partition in enumerate(spec.block.partition_names(), start=1):
                _write_file(disk_dir / partition / "partition", f"{number}\n", 0o444)
                _symlink(self._root / "class" / "block" / partition, disk_dir / partition)

    def _remove_device(self, device: _LiveDevice) -> None:
        """Remove a function and everything below it, as pci_stop_and_remove_bus_device does."""
        children = [
            d for d in self._devices.values() if d.physfn is None and d.spec.parent == device.spec.address
        ]
        for child in children:
            self._remove_device(child)
        if device.numvfs > 0:
            self._disable_vfs(device)
        if device.driver is not None:
            self._detach(device)

        spec = device.spec
        (self._root / "bus" / "pci" / "devices" / spec.address).unlink()
        for class_dir, name in self._class_entries(spec):
            (self._root / class_dir / name).unlink()
        if spec.iommu_group is not None:
            group_dir = self._root / "kernel" / "iommu_groups" / str(spec.iommu_group)
            (group_dir / "devices" / spec.address).unlink()
            if not any((group_dir / "devices").iterdir()):
                shutil.rmtree(group_dir)
        if device.physfn is not None:
            self._remove_virtfn_link(device)

        shutil.rmtree(self._root / device.directory)
        del self._devices[spec.address]
        del self._directories[device.directory]
        self._write_route_table()

    def _class_entries(self, spec: DeviceDescription) -> Iterator[tuple[str, str]]:
        if spec.net is not None:
            yield "class/net", spec.net.interface
        if spec.block is not None:
            yield "class/block", spec.block.name
            yield "block", spec.block.name
            for partition in spec.block.partition_names():
                yield "class/block", partition

    def _rescan(self, in_scope: Callable[[DeviceDescription], bool]) -> None:
        """Bring back removed functions in scope, and everything below them.

        A rescanned function is a new device to the kernel: its driver_override is
        unset, it probes its native driver, and an SR-IOV PF comes back with no VFs.
        """
        restored: set[str] = set()
        for spec in _parents_first(self._host.description.devices):
            if spec.address in self._devices:
                continue
            parent_ready = spec.parent is None or spec.parent in self._devices
            if parent_ready and (in_scope(spec) or spec.parent in restored):
                self._add_device(spec, physfn=None)
                restored.add(spec.address)
        self._write_route_table()

    # SR-IOV -----------------------------------------------------------------

    def _enable_vfs(self, pf: _LiveDevice, numvfs: int) -> None:
        for index in range(numvfs):
            vf = self._add_device(pf.spec.virtual_function(index), physfn=pf.spec.address)
            vf_dir = self._root / vf.directory
            _symlink(vf_dir / "physfn", self._root / pf.directory)
            _symlink(self._root / pf.directory / f"virtfn{index}", vf_dir)

        pf.numvfs = numvfs
        self._write_attribute(pf, "sriov_numvfs", f"{numvfs}\n")

    def _disable_vfs(self, pf: _LiveDevice) -> None:
        for vf in [d for d in self._devices.values() if d.physfn == pf.spec.address]:
            self._remove_device(vf)

        pf.numvfs = 0
        self._write_attribute(pf, "sriov_numvfs", "0\n")

    def _remove_virtfn_link(self, vf: _LiveDevice) -> None:
        pf = self._devices[cast(str, vf.physfn)]
        for link in (self._root / pf.directory).glob("virtfn*"):
            if os.readlink(link).endswith(f"/{vf.spec.address}"):
                link.unlink()

    def _write_attribute(self, device: _LiveDevice, name: str, content: str) -> None:
        path = self._root / device.directory / name
        mode = path.stat().st_mode & 0o777
        _write_file(path, content, mode)

    def _write_route_table(self) -> None:
        """Write /proc/net/route and ipv6_route for the present NICs and the virtual interfaces."""
        nets = [d.spec.net for d in self._devices.values() if d.spec.net is not None]
        nets += [virtual.as_net() for virtual in self._host.description.virtual_interfaces]
        nets.sort(key=lambda net: net.interface)
        net_dir = self._host.proc_root / "net"
        net_dir.mkdir(exist_ok=True)
        (net_dir / "route").write_text(_route_table(nets))
        (net_dir / "ipv6_route").write_text(_ipv6_route_table(nets))


def _parents_first(devices: Iterable[DeviceDescription]) -> list[DeviceDescription]:
    by_address = {device.address: device for device in devices}

    def depth(device: DeviceDescription) -> int:
        return 0 if device.parent is None else 1 + depth(by_address[device.parent])

    return sorted(by_address.values(), key=lambda device: (depth(device), device.address))
