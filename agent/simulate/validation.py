"""Checks of a host description that span several devices."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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

    nets = [d.net.interface for d in description.devices if d.net is not None]
    _require_unique(nets, f"{where}: duplicate network interface")
    blocks = [d.block.name for d in description.devices if d.block is not None]
    _require_unique(blocks, f"{where}: duplicate block device")
    mounts = [m for d in description.devices if d.block is not None for m in d.block.mounts]
    _require_unique(mounts, f"{where}: duplicate mount point")
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
