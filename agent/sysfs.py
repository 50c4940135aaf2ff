"""Every read the agent makes of a host's PCI functions, rooted at a configurable sysfs root.

Paths are built only from a parsed `PciAddress` and fixed attribute names, and are
checked to resolve under the root. On the real /sys, pyudev supplies udev's view: the
list of PCI devices and the names udev's hwdb gives them; the pci.ids database fills in
names that udev lacks. A simulated tree is read with the same code minus pyudev.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.pciids import PciIds
from devpass.errors import PciDeviceNotFound
from devpass.pci import PciAddress, device_type, is_bridge

REAL_SYSFS_ROOT = Path("/sys")
VFIO_DRIVER = "vfio-pci"
# PCIe extended capability id of the Device Serial Number (PCIe Base Specification 7.9.3).
_DSN_CAPABILITY = 0x0003
_EXTENDED_CONFIG_START = 0x100

log = structlog.get_logger()


@dataclass(frozen=True)
class PciFunctionInfo:
    """One PCI function as read from sysfs at one moment."""

    address: PciAddress
    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    class_code: int
    revision: str
    iommu_group: int | None
    driver: str | None
    driver_override: str | None
    numa_node: int
    boot_vga: bool
    physfn: PciAddress | None
    virtfns: tuple[PciAddress, ...]
    vendor_name: str = ""
    device_name: str = ""
    serial_number: str = ""
    udev_properties: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def type(self) -> str:
        return device_type(self.class_code)

    @property
    def is_bridge(self) -> bool:
        return is_bridge(self.class_code)

    @property
    def bound_to_vfio(self) -> bool:
        return self.driver == VFIO_DRIVER


@dataclass(frozen=True)
class Identity:
    """Identification of the hardware at an address beyond the address itself."""

    vendor_id: str
    device_id: str
    subsystem_vendor_id: str
    subsystem_device_id: str
    serial_number: str = ""

    @classmethod
    def of(cls, function: PciFunctionInfo) -> Identity:
        return cls(
            function.vendor_id,
            function.device_id,
            function.subsystem_vendor_id,
            function.subsystem_device_id,
            function.serial_number,
        )

    def differences(self, found: Identity) -> list[str]:
        """List the fields where `found` differs, each as `field expected -> found`."""
        changed = []
        for name in (
            "vendor_id",
            "device_id",
            "subsystem_vendor_id",
            "subsystem_device_id",
            "serial_number",
        ):
            expected, actual = getattr(self, name), getattr(found, name)
            # A serial number only counts when both sides could read one.
            if name == "serial_number" and not (expected and actual):
                continue
            if expected != actual:
                changed.append(f"{name} {expected} -> {actual}")

        return changed


class Sysfs:
    """Read-only view of the PCI bus under `root`.

    The instance caches no device state: every method reads the tree anew, so callers
    always see what the kernel (or the simulation) shows now.
    """

    def __init__(self, root: Path = REAL_SYSFS_ROOT, pci_ids: PciIds | None = None) -> None:
        self.root = Path(root)
        self._resolved_root = Path(os.path.realpath(self.root))
        self._pci_ids = pci_ids if pci_ids is not None else PciIds()
        self._udev = _UdevView.open() if self._resolved_root == REAL_SYSFS_ROOT else None

    @property
    def uses_udev(self) -> bool:
        return self._udev is not None

    def watch(self, on_change: Callable[[str, str], None]) -> Callable[[], None] | None:
        """Call `on_change(action, pci_address)` from a udev thread when a PCI device comes or goes.

        Returns a function that stops watching, or None without udev (a simulated tree,
        or a host without libudev), where the periodic rescan of the heartbeat finds
        changes instead.
        """
        if self._udev is None:
            return None

        return self._udev.watch(on_change)

    def iommu_enabled(self) -> bool:
        """Return whether the kernel has IOMMU groups (an IOMMU is present and turned on)."""
        groups = self.root / "kernel" / "iommu_groups"

        return groups.is_dir() and any(groups.iterdir())

    def vfio_available(self) -> bool:
        """Return whether the vfio-pci driver is registered on the PCI bus."""
        return (self.root / "bus" / "pci" / "drivers" / VFIO_DRIVER).is_dir()

    def list_addresses(self) -> list[PciAddress]:
        """List every PCI function's address, sorted."""
        if self._udev is not None:
            names = self._udev.pci_sys_names()
        else:
            devices = self.root / "bus" / "pci" / "devices"
            names = [entry.name for entry in devices.iterdir()] if devices.is_dir() else []

        return sorted(PciAddress.parse(name) for name in names)

    def list_functions(self) -> list[PciFunctionInfo]:
        """Read every PCI function; one that disappears during the scan is left out."""
        functions = []
        for address in self.list_addresses():
            try:
                functions.append(self.read_function(address))
            except PciDeviceNotFound:
                log.info("pci_function_vanished_during_scan", pci_address=str(address))

        return functions

    def read_function(self, address: PciAddress) -> PciFunctionInfo:
        """Read one PCI function.

        Raises:
            PciDeviceNotFound: no function exists at `address` on this host.
        """
        device_dir = self._device_dir(address)
        try:
            vendor_id = self._read_hex_id(device_dir, "vendor")
            device_id = self._read_hex_id(device_dir, "device")
            class_code = int(self._read(device_dir, "class"), 16)
        except FileNotFoundError as err:
            raise _not_found(address) from err

        udev_properties = self._udev.properties(address) if self._udev is not None else {}

        return PciFunctionInfo(
            address=address,
            vendor_id=vendor_id,
            device_id=device_id,
            subsystem_vendor_id=self._read_hex_id(device_dir, "subsystem_vendor", default="0000"),
            subsystem_device_id=self._read_hex_id(device_dir, "subsystem_device", default="0000"),
            class_code=class_code,
            revision=self._read_hex_id(device_dir, "revision", default="00", width=2),
            iommu_group=self._link_number(device_dir / "iommu_group"),
            driver=self._link_name(device_dir / "driver"),
            driver_override=self._driver_override(device_dir),
            numa_node=int(self._read(device_dir, "numa_node", default="-1")),
            boot_vga=self._read(device_dir, "boot_vga", default="0") == "1",
            physfn=self._link_address(device_dir / "physfn"),
            virtfns=self._virtfns(device_dir),
            vendor_name=udev_properties.get("ID_VENDOR_FROM_DATABASE")
            or self._pci_ids.vendor_name(vendor_id),
            device_name=udev_properties.get("ID_MODEL_FROM_DATABASE")
            or self._pci_ids.device_name(vendor_id, device_id),
            serial_number=_serial_number(device_dir / "config"),
            udev_properties=udev_properties,
        )

    def group_members(self, group: int) -> list[PciAddress]:
        """List the addresses in IOMMU group `group`, sorted."""
        devices = self.root / "kernel" / "iommu_groups" / str(group) / "devices"
        if not devices.is_dir():
            return []

        return sorted(PciAddress.parse(entry.name) for entry in devices.iterdir())

    def device_dir(self, address: PciAddress) -> Path:
        """Return the function's sysfs directory, checked to resolve under the root.

        Raises:
            PciDeviceNotFound: no function exists at `address`.
        """
        return self._device_dir(address)

    def _device_dir(self, address: PciAddress) -> Path:
        link = self.root / "bus" / "pci" / "devices" / str(address)
        resolved = Path(os.path.realpath(link))
        if not resolved.is_relative_to(self._resolved_root):
            raise ValueError(f"{link} resolves to {resolved}, outside the sysfs root {self.root}")
        if not resolved.is_dir():
            raise _not_found(address)

        return resolved

    def _read(self, device_dir: Path, attribute: str, default: str | None = None) -> str:
        try:
            return (device_dir / attribute).read_text().strip()
        except FileNotFoundError:
            if default is None:
                raise
            return default

    def _read_hex_id(
        self, device_dir: Path, attribute: str, default: str | None = None, width: int = 4
    ) -> str:
        value = self._read(device_dir, attribute, default)

        return f"{int(value, 16):0{width}x}"

    def _driver_override(self, device_dir: Path) -> str | None:
        value = self._read(device_dir, "driver_override", default="(null)")

        return None if value in ("", "(null)") else value

    @staticmethod
    def _link_name(link: Path) -> str | None:
        try:
            return Path(os.readlink(link)).name
        except FileNotFoundError:
            return None

    def _link_number(self, link: Path) -> int | None:
        name = self._link_name(link)

        return int(name) if name is not None else None

    def _link_address(self, link: Path) -> PciAddress | None:
        name = self._link_name(link)

        return PciAddress.parse(name) if name is not None else None

    def _virtfns(self, device_dir: Path) -> tuple[PciAddress, ...]:
        links = sorted(device_dir.glob("virtfn*"), key=lambda p: int(p.name.removeprefix("virtfn")))
        addresses = (self._link_address(link) for link in links)

        return tuple(address for address in addresses if address is not None)


def _not_found(address: PciAddress) -> PciDeviceNotFound:
    return PciDeviceNotFound(
        f"the host has no PCI function at {address}; list its functions with "
        "`devpass devices available --host HOST`",
        pci_address=str(address),
    )


def _serial_number(config: Path) -> str:
    """Return the Device Serial Number from extended config space, or "" when absent.

    Unprivileged readers and hosts without extended config space see only the first
    256 bytes, and so no serial number.
    """
    try:
        data = config.read_bytes()
    except OSError:
        return ""

    offset = _EXTENDED_CONFIG_START
    seen = set()
    while _EXTENDED_CONFIG_START <= offset <= len(data) - 12 and offset not in seen:
        seen.add(offset)
        (header,) = struct.unpack_from("<I", data, offset)
        if header == 0 or header == 0xFFFFFFFF:
            return ""
        if header & 0xFFFF == _DSN_CAPABILITY:
            low, high = struct.unpack_from("<II", data, offset + 4)
            return f"{(high << 32) | low:016x}"
        offset = (header >> 20) & 0xFFC

    return ""


class _UdevView:
    """udev's list of PCI devices and their properties, through pyudev."""

    def __init__(self, context: object) -> None:
        self._context = context

    @classmethod
    def open(cls) -> _UdevView | None:
        try:
            import pyudev

            return cls(pyudev.Context())
        except (ImportError, OSError) as err:
            log.warning("udev_unavailable", error=str(err), fallback="reading /sys directly")
            return None

    def watch(self, on_change: Callable[[str, str], None]) -> Callable[[], None]:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(self._context)
        monitor.filter_by(subsystem="pci")

        def handle(device: pyudev.Device) -> None:
            if device.action in ("add", "remove", "bind", "unbind", "change"):
                on_change(device.action, device.sys_name)

        observer = pyudev.MonitorObserver(monitor, callback=handle, name="udev-pci")
        observer.start()

        return observer.send_stop  # type: ignore[no-any-return]

    def pci_sys_names(self) -> list[str]:
        return [device.sys_name for device in self._context.list_devices(subsystem="pci")]  # type: ignore[attr-defined]

    def properties(self, address: PciAddress) -> dict[str, str]:
        import pyudev

        try:
            device = pyudev.Devices.from_name(self._context, "pci", str(address))
        except pyudev.DeviceNotFoundError:
            return {}

        return {key: device.properties[key] for key in device.properties}
