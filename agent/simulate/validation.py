"""Checks of a host description that span several devices."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from agent.simulate.devices import VFIO_DRIVER, DeviceDescription

if TYPE_CHECKING:
    from agent.simulate.description import HostDescription


def _validate_host(description: HostDescription) -> None:
    """Check the rules that span several devices."""
    where = f"host {description.host}"
    devices = {device.address: device for device in description.devices}
    _require_unique([d.address for d in description.devices], f"{where}: duplicate device address")

    for device in description.devices:
        _validate_groups(description, device)
        _validate_vfio_use(description, device)
        _validate_parent(devices, device, where)

    vf_addresses = [
        device.sriov.vf_address(index)
        for device in description.devices
        if device.sriov is not None
        for index in range(device.sriov.totalvfs)
    ]
    for address in vf_addresses:
        if address in devices:
            raise ValueError(f"{where}: VF address {address} is also a described device")
    _require_unique(vf_addresses, f"{where}: VF ranges overlap at")

    _validate_interfaces(description, where)
    _validate_block_devices(description, where)
    nodes = [node for d in description.devices for node in d.char_devices]
    _require_unique(nodes, f"{where}: duplicate char device")
    _require_unique([p.pid for p in description.processes], f"{where}: duplicate process id")

    if VFIO_DRIVER in description.loaded_drivers and not description.vfio:
        raise ValueError(f"{where}: loaded_drivers lists vfio-pci but vfio is false")


def _validate_groups(description: HostDescription, device: DeviceDescription) -> None:
    where = f"host {description.host}, device {device.address}"
    vf_groups = device.sriov.vf_groups if device.sriov is not None else ()
    if not description.iommu:
        if device.iommu_group is not None or vf_groups:
            raise ValueError(f"{where}: IOMMU groups are given but iommu is false")
        return

    if device.iommu_group is None:
        raise ValueError(f"{where}: missing required field 'iommu_group' (iommu is true)")
    if device.sriov is not None and len(vf_groups) != device.sriov.totalvfs:
        raise ValueError(
            f"{where}, sriov: field 'vf_groups' must list one group for each of the "
            f"{device.sriov.totalvfs} VFs, got {len(vf_groups)}"
        )


def _validate_vfio_use(description: HostDescription, device: DeviceDescription) -> None:
    drivers = [device.driver, device.sriov.vf_driver if device.sriov is not None else None]
    if VFIO_DRIVER in drivers and not description.vfio:
        raise ValueError(
            f"host {description.host}, device {device.address}: bound to vfio-pci but vfio is false"
        )


def _validate_parent(devices: Mapping[str, DeviceDescription], device: DeviceDescription, where: str) -> None:
    seen = {device.address}
    current = device
    while current.parent is not None:
        parent = devices.get(current.parent)
        if parent is None:
            raise ValueError(
                f"{where}, device {current.address}: parent {current.parent} is not a described device"
            )
        if parent.header_type != 1:
            raise ValueError(
                f"{where}, device {current.address}: parent {parent.address} has class "
                f"{parent.class_code}, not a PCI bridge (0604xx or 0609xx)"
            )
        if parent.address in seen:
            raise ValueError(f"{where}, device {device.address}: the parent chain loops at {parent.address}")
        seen.add(parent.address)
        current = parent


def _require_unique(values: Iterable[object], message: str) -> None:
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{message} {value}")
        seen.add(value)


def _validate_interfaces(description: HostDescription, where: str) -> None:
    """Check interface names and that bridges, bonds and VLANs stack on known interfaces."""
    nics = [d.net for d in description.devices if d.net is not None]
    virtuals = {v.name: v for v in description.virtual_interfaces}
    names = [net.interface for net in nics] + [v.name for v in description.virtual_interfaces]
    _require_unique(names, f"{where}: duplicate network interface")

    for net in nics:
        master = virtuals.get(net.master) if net.master is not None else None
        if net.master is not None and (master is None or master.kind == "vlan"):
            raise ValueError(
                f"{where}, interface {net.interface}: master {net.master} is not a bridge or bond "
                "in virtual_interfaces"
            )

    lower = {v.name: description.lower_interfaces(v) for v in description.virtual_interfaces}
    for name, below in lower.items():
        for interface in below:
            if interface not in names or interface == name:
                raise ValueError(
                    f"{where}, virtual interface {name}: lower interface {interface} is not described"
                )
    _require_acyclic(lower, f"{where}: virtual interfaces stack in a loop at")

    # A port belongs to at most one bridge or bond. VLANs do not enslave their parent.
    ports = [port for name, below in lower.items() if virtuals[name].kind != "vlan" for port in below]
    _require_unique(ports, f"{where}: interface is a port of two bridges or bonds:")


def _validate_block_devices(description: HostDescription, where: str) -> None:
    """Check disk names, mounts, dm and md slaves, swap devices and the root mount source."""
    disks = [d.block for d in description.devices if d.block is not None]
    virtuals = description.virtual_block_devices
    partitions = [name for disk in disks for name in disk.partition_names()]
    names = [disk.name for disk in disks] + partitions + [v.name for v in virtuals]
    _require_unique(names, f"{where}: duplicate block device")
    mounts = [m for disk in disks for m in disk.mounts] + [m for v in virtuals for m in v.mounts]
    _require_unique(mounts, f"{where}: duplicate mount point")

    for virtual in virtuals:
        for slave in virtual.slaves:
            if slave not in names or slave == virtual.name:
                raise ValueError(
                    f"{where}, virtual block device {virtual.name}: slave {slave} is not described"
                )
    _require_acyclic(
        {v.name: v.slaves for v in virtuals}, f"{where}: virtual block devices stack in a loop at"
    )

    nodes = {f"/dev/{name}" for name in names} | {v.mount_source for v in virtuals}
    for swap in description.swaps:
        if swap not in nodes:
            raise ValueError(f"{where}, field 'swaps': {swap} is not a described block device")
    if description.root_mount_source is not None and "/" not in mounts:
        raise ValueError(f"{where}: root_mount_source is set but no block device mounts /")


def _require_acyclic(edges: Mapping[str, Collection[str]], message: str) -> None:
    """Raise when following ``edges`` from any node comes back to it."""
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        if node in path:
            raise ValueError(f"{message} {node}")
        if node in done:
            return
        for successor in edges.get(node, ()):
            visit(successor, (*path, node))
        done.add(node)

    for node in edges:
        visit(node, ())
