"""Checks that decide whether a PCI function can be handed to a virtual machine."""

from __future__ import annotations

from dataclasses import dataclass

from agent.sysfs import VFIO_DRIVER, PciFunctionInfo, Sysfs
from devpass.errors import IommuGroupNotViable, IommuUnavailable, VfioUnavailable, iommu_unavailable
from devpass.pci import PciAddress


@dataclass(frozen=True)
class Blocker:
    """One reason that blocks passthrough, named by its ErrorInfo reason."""

    reason: str
    message: str
    pci_addresses: tuple[PciAddress, ...] = ()


def blockers(sysfs: Sysfs, function: PciFunctionInfo) -> list[Blocker]:
    """List what keeps `function` from being bound to vfio-pci, empty when nothing does."""
    found: list[Blocker] = []
    if function.iommu_group is None:
        found.append(Blocker(IommuUnavailable.reason, iommu_unavailable(str(function.address)).message))
    else:
        sibling_blocker = _group_blocker(sysfs, function, function.iommu_group)
        if sibling_blocker is not None:
            found.append(sibling_blocker)

    if not sysfs.vfio_available():
        found.append(Blocker(VfioUnavailable.reason, vfio_unavailable_message()))

    return found


def vfio_unavailable_message() -> str:
    return "the vfio-pci driver is not loaded on this host: run `modprobe vfio-pci` and retry"


def _group_blocker(sysfs: Sysfs, function: PciFunctionInfo, group: int) -> Blocker | None:
    """Return a blocker naming each group sibling that a host driver still holds."""
    held = [
        sibling
        for sibling in _siblings(sysfs, function.address, group)
        if sibling.driver not in (None, VFIO_DRIVER) and not sibling.is_bridge
    ]
    if not held:
        return None

    names = ", ".join(f"{sibling.address} ({sibling.driver})" for sibling in held)
    message = (
        f"IOMMU group {group} of {function.address} also contains {names}, bound to host "
        "drivers; a group goes to a virtual machine as a whole, so bind the whole group "
        "or move those functions off their drivers first"
    )

    return Blocker(IommuGroupNotViable.reason, message, tuple(s.address for s in held))


def _siblings(sysfs: Sysfs, address: PciAddress, group: int) -> list[PciFunctionInfo]:
    siblings = []
    for member in sysfs.group_members(group):
        if member != address:
            siblings.append(sysfs.read_function(member))

    return siblings
