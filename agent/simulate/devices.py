"""Descriptions of a simulated host's PCI functions, processes and their parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from devpass.pci import PciAddress

VFIO_DRIVER = "vfio-pci"

VirtualInterfaceKind = Literal["bridge", "bond", "vlan"]
VirtualBlockKind = Literal["dm", "md"]


@dataclass(frozen=True)
class SriovDescription:
    """SR-IOV capability of a physical function (PF) and the VFs it can create."""

    totalvfs: int
    numvfs: int
    vf_device: str
    first_vf: str
    vf_groups: tuple[int, ...] = ()
    vf_driver: str | None = None

    def vf_address(self, index: int) -> str:
        """Return the address of VF ``index``, counting routing IDs up from ``first_vf``.

        Routing-ID arithmetic lets a large VF range spill from function 7 into the next
        device number, as it does on real SR-IOV hardware.
        """
        first = PciAddress.parse(self.first_vf)
        routing_id = (first.bus << 8 | first.device << 3 | first.function) + index
        if routing_id > 0xFFFF:
            raise ValueError(f"VF {index} after {self.first_vf} is past the last bus number ff")

        address = PciAddress(
            domain=first.domain,
            bus=routing_id >> 8,
            device=(routing_id >> 3) & 0x1F,
            function=routing_id & 0x7,
        )

        return str(address)


@dataclass(frozen=True)
class NetDescription:
    """Network interface of a NIC function, and whether it carries the default route."""

    interface: str
    default_route: bool = False
    addresses: tuple[str, ...] = ()
    # The bridge or bond (a ``VirtualInterfaceDescription``) this interface is a port of.
    master: str | None = None


@dataclass(frozen=True)
class BlockDescription:
    """Disk of a storage function. Mount ``i`` is on partition ``i + 1``.

    The disk has ``partitions`` partitions, or one per mount when there are more mounts.
    """

    name: str
    mounts: tuple[str, ...] = ()
    partitions: int = 0

    @property
    def partition_count(self) -> int:
        """Number of partitions on the disk: at least one per mount."""
        return max(self.partitions, len(self.mounts))

    def partition_names(self) -> list[str]:
        """Return the kernel's names of all partitions, from partition 1 up."""
        return [self.partition_name(number) for number in range(1, self.partition_count + 1)]

    def partition_name(self, number: int) -> str:
        """Return the kernel's name for partition ``number`` (``nvme0n1p1``, ``sda1``)."""
        separator = "p" if self.name[-1].isdigit() else ""

        return f"{self.name}{separator}{number}"


@dataclass(frozen=True)
class DeviceDescription:
    """One PCI function of a simulated host, as the host boots.

    Hex ids are lower-case without ``0x``. Build descriptions through
    ``HostDescription.from_dict`` or ``from_yaml``, which validate them.
    """

    address: str
    vendor: str
    device: str
    class_code: str
    subsystem_vendor: str = "0000"
    subsystem_device: str = "0000"
    revision: str = "00"
    driver: str | None = None
    iommu_group: int | None = None
    numa_node: int = -1
    boot_vga: bool | None = None
    serial: str | None = None
    parent: str | None = None
    sriov: SriovDescription | None = None
    net: NetDescription | None = None
    block: BlockDescription | None = None
    char_devices: tuple[str, ...] = ()
    # A display device drives a framebuffer (class/graphics/fbN) or a DRM card
    # (class/drm/cardN, /dev/dri/cardN and renderD<128+N>) while a driver other than
    # vfio-pci is bound.
    framebuffer: bool = False
    drm: bool = False

    @property
    def is_vga(self) -> bool:
        """Whether the class is a VGA display controller, the only class with ``boot_vga``."""
        return self.class_code.startswith("0300")

    @property
    def header_type(self) -> int:
        """Config space header layout: 1 for PCI-to-PCI bridges, 2 for CardBus, else 0."""
        if self.class_code[:4] in ("0604", "0609"):
            return 1
        if self.class_code[:4] == "0607":
            return 2

        return 0

    def virtual_function(self, index: int) -> DeviceDescription:
        """Describe VF ``index`` of this PF as the kernel creates it.

        A VF sits beside its PF, repeats the PF's vendor, class, subsystem ids and NUMA
        node, and has the device id and driver named in the SR-IOV description.
        """
        if self.sriov is None:
            raise ValueError(f"{self.address} is not an SR-IOV physical function")

        groups = self.sriov.vf_groups
        return DeviceDescription(
            address=self.sriov.vf_address(index),
            vendor=self.vendor,
            device=self.sriov.vf_device,
            class_code=self.class_code,
            subsystem_vendor=self.subsystem_vendor,
            subsystem_device=self.subsystem_device,
            revision=self.revision,
            driver=self.sriov.vf_driver,
            iommu_group=groups[index] if groups else None,
            numa_node=self.numa_node,
            parent=self.parent,
        )


@dataclass(frozen=True)
class ProcessDescription:
    """A process with open files, for the simulated /proc."""

    pid: int
    comm: str
    open_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class VirtualInterfaceDescription:
    """A bridge, bond or VLAN interface stacked on other interfaces.

    ``lower`` names the interfaces below it: bridge ports, bond slaves or the one
    parent of a VLAN. NICs whose ``net.master`` names the interface are ports too.
    """

    name: str
    kind: VirtualInterfaceKind
    lower: tuple[str, ...] = ()
    default_route: bool = False
    addresses: tuple[str, ...] = ()

    def as_net(self) -> NetDescription:
        """Return the interface's routing facts in the form NIC interfaces use."""
        return NetDescription(self.name, self.default_route, self.addresses)


@dataclass(frozen=True)
class VirtualBlockDescription:
    """A device-mapper (dm-N) or software RAID (mdN) disk built on other block devices."""

    name: str
    kind: VirtualBlockKind
    slaves: tuple[str, ...]
    mounts: tuple[str, ...] = ()
    # Device-mapper name, linked as /dev/mapper/<dm_name> and used as the mount source.
    dm_name: str | None = None

    @property
    def mount_source(self) -> str:
        """Return the device path that /proc/mounts shows for this disk."""
        if self.dm_name is not None:
            return f"/dev/mapper/{self.dm_name}"

        return f"/dev/{self.name}"
