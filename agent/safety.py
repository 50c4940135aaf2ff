"""Checks that decide whether a PCI function may leave its driver for vfio-pci.

Every check runs before the first write of a bind. `check_bind` raises the first
problem; `blockers` lists all of them for `ListAvailableDevices`.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from agent.sysfs import VFIO_DRIVER, Identity, PciFunctionInfo, Sysfs
from agent.usage import HostUsage
from devpass.errors import (
    DeviceBusy,
    DevpassError,
    HostCriticalDevice,
    IdentityMismatch,
    IommuGroupNotViable,
    SriovPfHasVfs,
    VfioUnavailable,
    bridge_not_assignable,
    iommu_unavailable,
)
from devpass.pci import PciAddress

log = structlog.get_logger()


@dataclass(frozen=True)
class Blocker:
    """One reason that blocks passthrough, named by its ErrorInfo reason."""

    reason: str
    message: str
    pci_addresses: tuple[PciAddress, ...] = ()


def check_identity(function: PciFunctionInfo, expected: Identity | None) -> None:
    """Raise IdentityMismatch when the address now contains other hardware than `expected`."""
    if expected is None:
        return

    changes = expected.differences(Identity.of(function))
    if changes:
        raise IdentityMismatch(
            f"{function.address} now contains different hardware than was registered "
            f"({', '.join(changes)}), for example after a card was added and buses were "
            "renumbered; nothing was written. Unregister the entry and register the device again",
            pci_address=str(function.address),
            found=f"{function.vendor_id}:{function.device_id}",
        )


def check_bind(
    sysfs: Sysfs, usage: HostUsage, function: PciFunctionInfo, *, include_group: bool, force: bool
) -> list[PciFunctionInfo]:
    """Return the functions a bind moves: `function`, and its held siblings with `include_group`.

    Raises:
        VfioUnavailable, IommuUnavailable, SriovPfHasVfs, IommuGroupNotViable,
        HostCriticalDevice, DeviceBusy: the first problem found.
    """
    problems, members = _problems(sysfs, usage, function, include_group=include_group, force=force)
    if problems:
        raise problems[0]

    return members


def blockers(sysfs: Sysfs, usage: HostUsage, function: PciFunctionInfo) -> list[Blocker]:
    """List everything that keeps `function` from a plain bind; empty when it is assignable."""
    problems, _ = _problems(sysfs, usage, function, include_group=False, force=False)

    return [
        Blocker(
            problem.reason,
            problem.message,
            tuple(PciAddress.parse(a) for a in problem.metadata.get("siblings", "").split(",") if a),
        )
        for problem in problems
    ]


def _problems(
    sysfs: Sysfs, usage: HostUsage, function: PciFunctionInfo, *, include_group: bool, force: bool
) -> tuple[list[DevpassError], list[PciFunctionInfo]]:
    if function.is_bridge:
        return [bridge_not_assignable(str(function.address))], [function]

    # Without an IOMMU nothing else matters for passthrough, so that problem comes first.
    problems: list[DevpassError] = []
    if function.iommu_group is None:
        problems.append(iommu_unavailable(str(function.address)))
    if not sysfs.vfio_available():
        problems.append(
            VfioUnavailable(
                "the vfio-pci driver is not loaded on this host: run `modprobe vfio-pci` "
                "(and add it to /etc/modules-load.d/ to keep it across reboots), then retry",
                pci_address=str(function.address),
            )
        )
    if function.iommu_group is None:
        # Host-critical uses and holders still matter to an operator reading the listing.
        problems.extend(_critical(usage, function, force=force))
        problems.extend(_busy(usage, function))
        return problems, [function]

    members = [function]
    held = _held_siblings(sysfs, function, function.iommu_group)
    if held and not include_group:
        problems.append(_group_not_viable(usage, function, function.iommu_group, held))
    elif held:
        members.extend(held)

    for member in members:
        if member.virtfns:
            problems.append(_pf_has_vfs(member))
        problems.extend(_critical(usage, member, force=force))
        problems.extend(_busy(usage, member))

    return problems, members


def _held_siblings(sysfs: Sysfs, function: PciFunctionInfo, group: int) -> list[PciFunctionInfo]:
    """Return the group's other functions that a host driver holds; bridges never count."""
    held = []
    for member in sysfs.group_members(group):
        if member == function.address:
            continue
        sibling = sysfs.read_function(member)
        if sibling.driver not in (None, VFIO_DRIVER) and not sibling.is_bridge:
            held.append(sibling)

    return held


def _group_not_viable(
    usage: HostUsage, function: PciFunctionInfo, group: int, held: list[PciFunctionInfo]
) -> IommuGroupNotViable:
    described = []
    any_critical = False
    for sibling in held:
        uses = usage.critical_uses(sibling.address)
        any_critical = any_critical or bool(uses)
        critical = f", host-critical: {'; '.join(u.detail for u in uses)}" if uses else ""
        described.append(f"{sibling.address} ({sibling.driver}{critical})")
    if any_critical:
        advice = (
            "A group goes to one virtual machine as a whole, and the host depends on a member "
            "of this one, so this device cannot be passed through without taking that away "
            "(include_group with force, --include-group --force on the CLI, would do it)"
        )
    else:
        advice = (
            "A group goes to one virtual machine as a whole: pass include_group (--include-group "
            "on the CLI) to bind every function of the group, or move those functions off "
            "their drivers first"
        )

    return IommuGroupNotViable(
        f"IOMMU group {group} of {function.address} also contains {', '.join(described)}, "
        f"still bound to host drivers. {advice}",
        pci_address=str(function.address),
        iommu_group=str(group),
        siblings=",".join(str(s.address) for s in held),
    )


def _pf_has_vfs(function: PciFunctionInfo) -> SriovPfHasVfs:
    return SriovPfHasVfs(
        f"{function.address} is an SR-IOV physical function with {len(function.virtfns)} "
        "virtual functions enabled; pass through a VF instead, or write 0 to its sriov_numvfs first",
        pci_address=str(function.address),
        virtfns=",".join(str(v) for v in function.virtfns),
    )


def _critical(usage: HostUsage, function: PciFunctionInfo, *, force: bool) -> list[DevpassError]:
    uses = usage.critical_uses(function.address)
    if not uses:
        return []
    details = "; ".join(use.detail for use in uses)
    if force:
        log.warning(
            "host_critical_device_forced",
            pci_address=str(function.address),
            uses=details,
            check="the host may lose a filesystem, its network or its console",
        )
        return []

    return [
        HostCriticalDevice(
            f"{function.address} is critical to the host: {details}. Moving it to vfio-pci "
            "would take that away from the host; pass force (--force on the CLI) to do it anyway",
            pci_address=str(function.address),
            uses=",".join(use.kind for use in uses),
        )
    ]


def _busy(usage: HostUsage, function: PciFunctionInfo) -> list[DevpassError]:
    holders = usage.holders(function.address)
    if not holders:
        return []
    named = ", ".join(f"pid {h.pid} ({h.command}) has {h.path} open" for h in holders)

    return [
        DeviceBusy(
            f"{function.address} is in use: {named}. Stop those processes (for example the "
            "NVIDIA persistence daemon or a metrics exporter), then retry",
            pci_address=str(function.address),
            pids=",".join(str(h.pid) for h in holders),
        )
    ]
