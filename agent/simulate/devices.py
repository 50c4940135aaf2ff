"""Descriptions of a simulated host's PCI functions, processes and their parts."""

from __future__ import annotations

from dataclasses import dataclass

from devpass.pci import PciAddress

VFIO_DRIVER = "vfio-pci"


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


@dataclass(frozen=True)
class BlockDescription:
    """Disk of a storage function. Mount ``i`` is on partition ``i + 1``."""

    name: str
    mounts: tuple[str, ...] = ()

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
