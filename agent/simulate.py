"""A simulated host: a sysfs, /dev and /proc tree in a directory, and a kernel for its writes.

Tests and demos run the agent's real read and write code against this tree instead of
the machine's own /sys. ``HostDescription`` is parsed from a YAML host description,
``SimulatedHost.build`` lays out the tree the way Linux does, and ``SimulatedKernel``
applies the kernel's rules (and its errno values) to every write the agent makes.

The layout and the errno values follow Linux 6.x (drivers/base/dd.c and bus.c,
drivers/pci/pci-sysfs.c and iov.c, drivers/vfio/pci/vfio_pci_core.c):

- ``sys/devices/pci<domain>:<bus>/[<bridge>/...]<address>/`` contains each function's
  attributes, with relative ``driver``, ``iommu_group``, ``subsystem``, ``physfn`` and
  ``virtfnN`` links.
- ``sys/bus/pci/{devices,drivers,drivers_probe,rescan}``, ``sys/kernel/iommu_groups``,
  ``sys/class/{net,block}`` and ``sys/module/vfio_pci`` are where the kernel puts them.
- ``dev/vfio/<group>`` exists while a function of the group is bound to vfio-pci.
- ``proc/<pid>/fd`` links point at absolute paths under the simulated dev root.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, cast

import yaml

from devpass.errors import InvalidPciAddress
from devpass.pci import PciAddress

VFIO_DRIVER = "vfio-pci"

FaultAttribute = Literal["driver_override", "unbind", "bind", "drivers_probe", "sriov_numvfs", "remove"]
FaultError = Literal["EBUSY", "ENODEV", "HANG"]

_FAULT_ATTRIBUTES: frozenset[str] = frozenset(
    {"driver_override", "unbind", "bind", "drivers_probe", "sriov_numvfs", "remove"}
)
_FAULT_ERRNOS = {"EBUSY": errno.EBUSY, "ENODEV": errno.ENODEV}
# Only writes to these attributes name a driver.
_DRIVER_ATTRIBUTES = frozenset({"bind", "unbind"})

_DRIVER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Interface names: at most 15 characters (IFNAMSIZ - 1), no '/' or whitespace.
_INTERFACE_NAME = re.compile(r"^[^/\s:]{1,15}$")
_BLOCK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# The kernel keeps at most 15 characters of a command name (TASK_COMM_LEN - 1).
_COMM_LENGTH = 15
# A sysfs store function receives at most one page.
_PAGE_SIZE = 4096
# Size of a PCIe function's config space as root reads it from sysfs.
_CONFIG_SPACE_SIZE = 4096
_DSN_CAPABILITY_OFFSET = 0x100

_MISSING = object()


# ---------------------------------------------------------------------------
# Host descriptions
# ---------------------------------------------------------------------------


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


@dataclass(frozen=True)
class HostDescription:
    """A whole simulated host: its name, IOMMU and vfio state, PCI functions and processes."""

    host: str
    iommu: bool
    vfio: bool
    devices: tuple[DeviceDescription, ...]
    loaded_drivers: tuple[str, ...] = ()
    processes: tuple[ProcessDescription, ...] = ()

    @classmethod
    def from_yaml(cls, path: Path) -> HostDescription:
        """Load and validate a host description file.

        Raises:
            ValueError: the file is not valid YAML or breaks a rule of the description;
                the message names the file, the device and the field.
        """
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from err

        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_dict(cls, data: object) -> HostDescription:
        """Validate a parsed host description.

        Raises:
            ValueError: a field is missing, has the wrong type or contradicts another;
                the message names the device and the field.
        """
        fields = _Fields(data, "host description", _HOST_FIELDS)
        host = fields.text("host")
        fields = fields.at(f"host {host}")
        description = cls(
            host=host,
            iommu=fields.flag("iommu"),
            vfio=fields.flag("vfio"),
            devices=tuple(
                _parse_device(item, f"host {host}", index)
                for index, item in enumerate(fields.items("devices"))
            ),
            loaded_drivers=tuple(
                _driver_name(name, f"host {host}, loaded_drivers")
                for name in fields.text_list("loaded_drivers")
            ),
            processes=tuple(
                _parse_process(item, f"host {host}", index)
                for index, item in enumerate(fields.items("processes", required=False))
            ),
        )
        _validate_host(description)

        return description

    @property
    def drivers(self) -> frozenset[str]:
        """Names of the PCI drivers loaded at boot.

        These are the drivers bound to a described function, the extra
        ``loaded_drivers`` and vfio-pci when ``vfio`` is true. A ``vf_driver`` counts
        only when it is also one of these, so a description can leave VFs unbound.
        """
        names = {device.driver for device in self.devices if device.driver is not None}
        names.update(self.loaded_drivers)
        if self.vfio:
            names.add(VFIO_DRIVER)

        return frozenset(names)

    def device(self, address: str) -> DeviceDescription:
        """Return the described function at ``address``.

        Raises:
            KeyError: no described function has that address.
        """
        for device in self.devices:
            if device.address == address:
                return device

        raise KeyError(f"host {self.host} describes no PCI function at {address}")


_HOST_FIELDS = frozenset({"host", "iommu", "vfio", "loaded_drivers", "devices", "processes"})
_DEVICE_FIELDS = frozenset(
    {
        "address",
        "vendor",
        "device",
        "subsystem_vendor",
        "subsystem_device",
        "class",
        "revision",
        "driver",
        "iommu_group",
        "numa_node",
        "boot_vga",
        "serial",
        "parent",
        "sriov",
        "net",
        "block",
        "char_devices",
    }
)
_SRIOV_FIELDS = frozenset({"totalvfs", "numvfs", "vf_device", "first_vf", "vf_groups", "vf_driver"})
_NET_FIELDS = frozenset({"interface", "default_route", "addresses"})
_BLOCK_FIELDS = frozenset({"name", "mounts"})
_PROCESS_FIELDS = frozenset({"pid", "comm", "open"})


class _Fields:
    """Typed reads of one YAML mapping, with errors that name the field and its place."""

    def __init__(self, data: object, where: str, allowed: frozenset[str]) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {_describe(data)}")

        unknown = sorted(str(key) for key in data if key not in allowed)
        if unknown:
            raise ValueError(
                f"{where}: unknown field {', '.join(unknown)}. "
                f"allowed fields are {', '.join(sorted(allowed))}"
            )

        self._data: dict[object, object] = data
        self._allowed = allowed
        self.where = where

    def at(self, where: str) -> _Fields:
        """Return the same fields, with errors placed at ``where``."""
        return _Fields(self._data, where, self._allowed)

    def error(self, key: str, expected: str) -> ValueError:
        value = self._data.get(key)

        return ValueError(f"{self.where}: field '{key}' must be {expected}, got {_describe(value)}")

    def value(self, key: str, default: object = _MISSING) -> object:
        value = self._data.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            raise ValueError(f"{self.where}: missing required field '{key}'")

        return default

    def text(self, key: str) -> str:
        value = self.value(key)
        if not isinstance(value, str) or not value:
            raise self.error(key, "a non-empty string")

        return value

    def optional_text(self, key: str) -> str | None:
        value = self.value(key, None)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.error(key, "a non-empty string")

        return value

    def hex_id(self, key: str, digits: int, default: str | None = None) -> str:
        value = self.value(key, _MISSING if default is None else default)
        text = value.lower().removeprefix("0x") if isinstance(value, str) else ""
        if not re.fullmatch(f"[0-9a-f]{{{digits}}}", text):
            # YAML reads an unquoted 030200 as a number, so the usual mistake is quoting.
            raise self.error(key, f'{digits} hex digits in quotes, for example "{"0" * digits}"')

        return text

    def flag(self, key: str, default: bool | None = None) -> bool:
        value = self.value(key, _MISSING if default is None else default)
        if not isinstance(value, bool):
            raise self.error(key, "true or false")

        return value

    def integer(self, key: str, minimum: int, default: int | None = None) -> int:
        value = self.value(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"an integer of at least {minimum}")

        return value

    def optional_integer(self, key: str, minimum: int) -> int | None:
        if self.value(key, None) is None:
            return None

        return self.integer(key, minimum)

    def text_list(self, key: str) -> tuple[str, ...]:
        values = self.value(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise self.error(key, "a list of non-empty strings")

        return tuple(cast(list[str], values))

    def integer_list(self, key: str, minimum: int) -> tuple[int, ...]:
        values = self.value(key, [])
        valid = isinstance(values, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values
        )
        if not valid:
            raise self.error(key, f"a list of integers of at least {minimum}")

        return tuple(cast(list[int], values))

    def items(self, key: str, required: bool = True) -> list[object]:
        values = self.value(key, _MISSING if required else [])
        if not isinstance(values, list):
            raise self.error(key, "a list")

        return values

    def child(self, key: str, allowed: frozenset[str]) -> _Fields | None:
        value = self.value(key, None)
        if value is None:
            return None

        return _Fields(value, f"{self.where}, {key}", allowed)


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


def _canonical_address(text: str, where: str) -> str:
    try:
        address = str(PciAddress.parse(text))
    except InvalidPciAddress as err:
        raise ValueError(f"{where}: {err.message}") from err
    if address != text:
        raise ValueError(f"{where}: write the address {text!r} in canonical form {address!r}")

    return address


def _driver_name(name: str, where: str) -> str:
    if not _DRIVER_NAME.match(name):
        raise ValueError(f"{where}: invalid driver name {name!r}: use letters, digits, '_', '.' and '-'")

    return name


def _parse_device(data: object, host_where: str, index: int) -> DeviceDescription:
    where = f"{host_where}, devices[{index}]"
    fields = _Fields(data, where, _DEVICE_FIELDS)
    address = _canonical_address(fields.text("address"), f"{where}, field 'address'")
    fields = fields.at(f"{host_where}, device {address}")

    class_code = fields.hex_id("class", 6)
    driver = fields.optional_text("driver")
    return DeviceDescription(
        address=address,
        vendor=fields.hex_id("vendor", 4),
        device=fields.hex_id("device", 4),
        class_code=class_code,
        subsystem_vendor=fields.hex_id("subsystem_vendor", 4, default="0000"),
        subsystem_device=fields.hex_id("subsystem_device", 4, default="0000"),
        revision=fields.hex_id("revision", 2, default="00"),
        driver=_driver_name(driver, fields.where) if driver is not None else None,
        iommu_group=fields.optional_integer("iommu_group", minimum=0),
        numa_node=fields.integer("numa_node", minimum=-1, default=-1),
        boot_vga=_parse_boot_vga(fields, class_code),
        serial=_parse_serial(fields),
        parent=_optional_address(fields, "parent"),
        sriov=_parse_sriov(fields.child("sriov", _SRIOV_FIELDS)),
        net=_parse_net(fields.child("net", _NET_FIELDS)),
        block=_parse_block(fields.child("block", _BLOCK_FIELDS)),
        char_devices=tuple(
            _dev_path(path, f"{fields.where}, char_devices") for path in fields.text_list("char_devices")
        ),
    )


def _parse_boot_vga(fields: _Fields, class_code: str) -> bool | None:
    if not class_code.startswith("0300"):
        if fields.value("boot_vga", None) is not None:
            raise ValueError(
                f"{fields.where}: field 'boot_vga' applies only to VGA class 0300xx, not class {class_code}"
            )
        return None

    return fields.flag("boot_vga", default=False)


def _parse_serial(fields: _Fields) -> str | None:
    """Return the Device Serial Number as 16 hex digits, accepting lspci's dashed form too."""
    value = fields.optional_text("serial")
    if value is None:
        return None

    digits = value.replace("-", "").lower()
    if not re.fullmatch("[0-9a-f]{16}", digits):
        raise fields.error("serial", '16 hex digits, for example "b8-ce-f6-03-00-a1-b2-c3"')

    return digits


def _optional_address(fields: _Fields, key: str) -> str | None:
    text = fields.optional_text(key)
    if text is None:
        return None

    return _canonical_address(text, f"{fields.where}, field '{key}'")


def _parse_sriov(fields: _Fields | None) -> SriovDescription | None:
    if fields is None:
        return None

    totalvfs = fields.integer("totalvfs", minimum=1)
    numvfs = fields.integer("numvfs", minimum=0, default=0)
    if numvfs > totalvfs:
        raise fields.error("numvfs", f"at most totalvfs ({totalvfs})")
    vf_driver = fields.optional_text("vf_driver")
    sriov = SriovDescription(
        totalvfs=totalvfs,
        numvfs=numvfs,
        vf_device=fields.hex_id("vf_device", 4),
        first_vf=_canonical_address(fields.text("first_vf"), f"{fields.where}, field 'first_vf'"),
        vf_groups=fields.integer_list("vf_groups", minimum=0),
        vf_driver=_driver_name(vf_driver, fields.where) if vf_driver is not None else None,
    )
    try:
        sriov.vf_address(totalvfs - 1)
    except ValueError as err:
        raise ValueError(f"{fields.where}: {err}") from err

    return sriov


def _parse_net(fields: _Fields | None) -> NetDescription | None:
    if fields is None:
        return None

    interface = fields.text("interface")
    if not _INTERFACE_NAME.match(interface):
        raise fields.error("interface", "an interface name of 1 to 15 characters without '/', ':' or spaces")

    addresses = []
    for text in fields.text_list("addresses"):
        try:
            addresses.append(str(ipaddress.ip_interface(text)))
        except ValueError as err:
            raise ValueError(f"{fields.where}, field 'addresses': {err}") from err

    return NetDescription(
        interface=interface,
        default_route=fields.flag("default_route", default=False),
        addresses=tuple(addresses),
    )


def _parse_block(fields: _Fields | None) -> BlockDescription | None:
    if fields is None:
        return None

    name = fields.text("name")
    if not _BLOCK_NAME.match(name):
        raise fields.error("name", "a block device name such as nvme0n1 or sda")

    mounts = fields.text_list("mounts")
    for mount in mounts:
        if not mount.startswith("/") or any(c.isspace() for c in mount):
            raise fields.error("mounts", "absolute mount points without spaces")

    return BlockDescription(name=name, mounts=mounts)


def _parse_process(data: object, host_where: str, index: int) -> ProcessDescription:
    fields = _Fields(data, f"{host_where}, processes[{index}]", _PROCESS_FIELDS)
    pid = fields.integer("pid", minimum=1)
    fields = fields.at(f"{host_where}, process {pid}")
    open_files = fields.text_list("open")
    for path in open_files:
        if not path.startswith("/"):
            raise fields.error("open", "a list of absolute paths")

    return ProcessDescription(pid=pid, comm=fields.text("comm"), open_files=open_files)


def _dev_path(path: str, where: str) -> str:
    parts = PurePosixPath(path).parts
    if len(parts) < 3 or parts[:2] != ("/", "dev") or ".." in parts:
        raise ValueError(f"{where}: {path!r} is not a path under /dev")

    return path


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


# ---------------------------------------------------------------------------
# The simulated host
# ---------------------------------------------------------------------------


class SimulatedHost:
    """A host's sysfs, /dev and /proc trees under one base directory.

    The tree is written once by ``build``. After that only ``kernel`` changes it,
    so every change goes through the same checks a real kernel makes.
    """

    def __init__(self, description: HostDescription, base: Path) -> None:
        self._description = description
        self._base = base
        self._kernel = SimulatedKernel(self)

    @classmethod
    def build(cls, description: HostDescription, base: Path) -> SimulatedHost:
        """Create ``base/sys``, ``base/dev`` and ``base/proc`` for ``description``.

        Raises:
            ValueError: ``base`` exists and is not an empty directory.
        """
        base = Path(base)
        if base.exists() and (not base.is_dir() or any(base.iterdir())):
            raise ValueError(f"cannot build a simulated host in {base}: it is not an empty directory")

        base.mkdir(parents=True, exist_ok=True)
        base = Path(os.path.realpath(base))
        for name in ("sys", "dev", "proc"):
            (base / name).mkdir()
        _write_dev_nodes(description, base / "dev")
        _write_processes(description, base / "proc", base / "dev")
        _write_mounts(description, base / "proc")

        return cls(description, base)

    @property
    def description(self) -> HostDescription:
        return self._description

    @property
    def base(self) -> Path:
        return self._base

    @property
    def sysfs_root(self) -> Path:
        return self._base / "sys"

    @property
    def dev_root(self) -> Path:
        return self._base / "dev"

    @property
    def proc_root(self) -> Path:
        return self._base / "proc"

    @property
    def kernel(self) -> SimulatedKernel:
        return self._kernel

    def device_path(self, address: str) -> Path:
        """Return ``sys/bus/pci/devices/<address>``, the link to the function's directory."""
        return self.sysfs_root / "bus" / "pci" / "devices" / address


def _write_dev_nodes(description: HostDescription, dev_root: Path) -> None:
    """Create the device nodes as plain files, since tests cannot call mknod."""
    nodes = ["/dev/null"]
    if description.vfio:
        nodes.append("/dev/vfio/vfio")
    for device in description.devices:
        nodes.extend(device.char_devices)
        if device.block is not None:
            nodes.append(f"/dev/{device.block.name}")
            nodes.extend(
                f"/dev/{device.block.partition_name(number)}"
                for number in range(1, len(device.block.mounts) + 1)
            )

    for node in nodes:
        path = _under_dev_root(dev_root, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def _under_dev_root(dev_root: Path, path: str) -> Path:
    return dev_root.joinpath(*PurePosixPath(path).parts[2:])


def _write_processes(description: HostDescription, proc_root: Path, dev_root: Path) -> None:
    for process in description.processes:
        process_dir = proc_root / str(process.pid)
        (process_dir / "fd").mkdir(parents=True)
        (process_dir / "comm").write_text(process.comm[:_COMM_LENGTH] + "\n")
        (process_dir / "cmdline").write_text(process.comm + "\0")

        # Descriptors 0 to 2 are the standard streams, as for a daemon started by init.
        targets = [str(dev_root / "null")] * 3 + [
            str(_under_dev_root(dev_root, path)) if path.startswith("/dev/") else path
            for path in process.open_files
        ]
        for number, target in enumerate(targets):
            os.symlink(target, process_dir / "fd" / str(number))


def _write_mounts(description: HostDescription, proc_root: Path) -> None:
    lines = [
        "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0",
        "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0",
        "devtmpfs /dev devtmpfs rw,nosuid,relatime,mode=755 0 0",
        "tmpfs /run tmpfs rw,nosuid,nodev,noexec,relatime,mode=755 0 0",
    ]
    for device in description.devices:
        if device.block is None:
            continue
        for number, mount in enumerate(device.block.mounts, start=1):
            fstype = "vfat" if mount == "/boot/efi" else "ext4"
            partition = device.block.partition_name(number)
            lines.append(f"/dev/{partition} {mount} {fstype} rw,relatime 0 0")

    (proc_root / "mounts").write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------
# The simulated kernel
# ---------------------------------------------------------------------------


@dataclass
class _LiveDevice:
    """Kernel state of one present PCI function, mutable because binds change it."""

    spec: DeviceDescription
    directory: PurePosixPath
    physfn: str | None = None
    driver: str | None = None
    driver_override: str | None = None
    numvfs: int = 0


@dataclass(frozen=True)
class _Operation:
    """A write resolved to the kernel attribute it reaches."""

    attribute: str
    address: str | None = None
    driver: str | None = None


@dataclass
class _Fault:
    attribute: str
    error: FaultError
    address: str | None
    driver: str | None
    remaining: int

    def matches(self, operation: _Operation) -> bool:
        return (
            self.attribute == operation.attribute
            and self.address in (None, operation.address)
            and self.driver in (None, operation.driver)
        )


class SimulatedKernel:
    """KernelWriter that applies Linux's sysfs write semantics to a simulated tree.

    The kernel owns all state that writes change (drivers, driver_override, present
    functions, VFs) and keeps the tree in step with it under one lock. Writes may come
    from several threads. A write that hangs through fault injection waits without the
    lock, so other writes and ``release_hangs`` still go through.
    """

    def __init__(self, host: SimulatedHost, *, hang_timeout: float = 30.0) -> None:
        """Boot the kernel: lay out the host's sysfs tree as the description gives it.

        ``hang_timeout`` bounds in seconds how long an injected HANG blocks when no
        test releases it, so a forgotten hang cannot keep the test process alive.
        """
        self._host = host
        self._root = host.sysfs_root
        self._lock = threading.Lock()
        self._hang_changed = threading.Condition(self._lock)
        self.hang_timeout = hang_timeout
        self._devices: dict[str, _LiveDevice] = {}
        self._directories: dict[PurePosixPath, str] = {}
        self._writes: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._hangs: list[threading.Event] = []
        self._boot()

    # Public interface -------------------------------------------------------

    @property
    def writes(self) -> list[tuple[str, str]]:
        """Every write attempted under the sysfs root, as (path relative to the root, value).

        The path is the one the writer gave, so a write through
        ``bus/pci/devices/<address>/driver_override`` is recorded under that name.
        """
        with self._lock:
            return list(self._writes)

    @property
    def hanging_writes(self) -> int:
        """Number of writes blocked by an injected HANG right now."""
        with self._lock:
            return len(self._hangs)

    def write(self, path: Path, value: str) -> None:
        """Apply a write of ``value`` to the attribute at ``path``.

        Raises:
            ValueError: ``path`` resolves outside the simulated sysfs root.
            OSError: the kernel rejected the write, and ``errno`` is the kernel's code.
                An injected fault raises its errno, and a released HANG raises EINTR.
        """
        relative, target = self._locate(Path(path))
        with self._lock:
            self._writes.append((relative, value))
            operation = self._classify(target, value)
            fault = self._take_fault(operation)
            if fault is None:
                self._apply(operation, value)
                return
            if fault.error != "HANG":
                raise _kernel_error(_FAULT_ERRNOS[fault.error], f"injected fault on {relative}")

            release = threading.Event()
            self._hangs.append(release)
            self._hang_changed.notify_all()

        released = release.wait(self.hang_timeout)
        with self._lock:
            if release in self._hangs:
                self._hangs.remove(release)
                self._hang_changed.notify_all()

        reason = "released" if released else f"not released within {self.hang_timeout} s"
        raise _kernel_error(errno.EINTR, f"injected hang on {relative} {reason}")

    def inject_fault(
        self,
        attribute: FaultAttribute,
        error: FaultError,
        *,
        address: str | None = None,
        driver: str | None = None,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` matching writes fail with ``error``.

        EBUSY and ENODEV raise that errno without changing any state. HANG blocks
        the writing thread until ``release_hangs`` and then raises EINTR, also
        without changing state. ``address`` limits the fault to one function, and
        ``driver`` (for bind and unbind only) to one driver.

        Raises:
            ValueError: unknown attribute or error, ``times`` below 1, or a driver
                given for an attribute that names none.
        """
        if attribute not in _FAULT_ATTRIBUTES:
            raise ValueError(
                f"cannot inject a fault on {attribute!r}: use one of {sorted(_FAULT_ATTRIBUTES)}"
            )
        if error not in ("EBUSY", "ENODEV", "HANG"):
            raise ValueError(f"unknown fault {error!r}: use EBUSY, ENODEV or HANG")
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        if driver is not None and attribute not in _DRIVER_ATTRIBUTES:
            raise ValueError(f"a {attribute} write names no driver, so driver={driver!r} can never match")

        with self._lock:
            self._faults.append(_Fault(attribute, error, address, driver, times))

    def clear_faults(self) -> None:
        """Remove every injected fault that has not fired yet."""
        with self._lock:
            self._faults.clear()

    def release_hangs(self) -> None:
        """Unblock every write that an injected HANG is blocking, so each raises EINTR."""
        with self._lock:
            for event in self._hangs:
                event.set()
            self._hangs.clear()
            self._hang_changed.notify_all()

    def wait_for_hangs(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` writes hang, and return False after ``timeout`` seconds."""
        with self._hang_changed:
            return self._hang_changed.wait_for(lambda: len(self._hangs) >= count, timeout)

    # Resolving a write ------------------------------------------------------

    def _locate(self, path: Path) -> tuple[str, Path]:
        """Return the write's path relative to the root, as given, and its resolved target."""
        parent = Path(os.path.realpath(path.parent))
        if parent != self._root and self._root not in parent.parents:
            raise ValueError(
                f"cannot write {path}: it resolves to {parent / path.name}, "
                f"outside the simulated sysfs root {self._root}"
            )

        target = parent / path.name
        try:
            relative = path.relative_to(self._root)
        except ValueError:
            relative = target.relative_to(self._root)

        return relative.as_posix(), target

    def _classify(self, target: Path, value: str) -> _Operation:
        """Name the attribute a write reaches, or raise the open(2) error it would get."""
        if not target.exists():
            raise _kernel_error(errno.ENOENT, f"no such attribute {target.relative_to(self._root)}")
        if target.is_dir():
            raise _kernel_error(errno.EISDIR, f"{target.relative_to(self._root)} is a directory")

        parent = PurePosixPath(target.parent.relative_to(self._root).as_posix())
        name = target.name
        written_address = _strip_newline(value)
        if parent == PurePosixPath("bus/pci") and name in ("drivers_probe", "rescan"):
            return _Operation(name, address=written_address if name == "drivers_probe" else None)
        if parent.parent == PurePosixPath("bus/pci/drivers") and name in (
            "bind",
            "unbind",
            "new_id",
            "remove_id",
        ):
            return _Operation(name, address=written_address, driver=parent.name)

        address = self._directories.get(parent)
        if address is not None and name in ("driver_override", "remove", "rescan", "sriov_numvfs"):
            return _Operation(name, address=address)

        raise _kernel_error(errno.EACCES, f"{target.relative_to(self._root)} is not writable")

    def _take_fault(self, operation: _Operation) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(operation):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault

        return None

    def _apply(self, operation: _Operation, value: str) -> None:
        handlers: dict[str, Callable[[_Operation, str], None]] = {
            "driver_override": self._store_driver_override,
            "bind": self._store_bind,
            "unbind": self._store_unbind,
            "drivers_probe": self._store_drivers_probe,
            "new_id": self._store_dynamic_id,
            "remove_id": self._store_dynamic_id,
            "sriov_numvfs": self._store_sriov_numvfs,
            "remove": self._store_remove,
            "rescan": self._store_rescan,
        }
        handlers[operation.attribute](operation, value)

    # Attribute stores -------------------------------------------------------

    def _store_driver_override(self, operation: _Operation, value: str) -> None:
        if len(value.encode()) >= _PAGE_SIZE - 1:
            raise _kernel_error(errno.EINVAL, "driver_override value is longer than a page")

        # The kernel keeps the text before the first newline, and empty text clears it.
        override = value.split("\n", 1)[0]
        device = self._device(operation)
        device.driver_override = override or None
        self._write_attribute(device, "driver_override", f"{override or '(null)'}\n")

    def _store_bind(self, operation: _Operation, value: str) -> None:
        device = self._devices.get(_strip_newline(value))
        driver = cast(str, operation.driver)
        if device is None or not self._driver_matches(device, driver):
            raise _kernel_error(errno.ENODEV, f"bind: {value.strip()!r} does not match driver {driver}")
        if device.driver is not None:
            raise _kernel_error(
                errno.EBUSY, f"bind: {device.spec.address} is already bound to {device.driver}"
            )

        error = self._probe_error(device, driver)
        if error is not None:
            raise error

        self._attach(device, driver)

    def _store_unbind(self, operation: _Operation, value: str) -> None:
        device = self._devices.get(_strip_newline(value))
        if device is None or device.driver != operation.driver:
            raise _kernel_error(errno.ENODEV, f"unbind: {value.strip()!r} is not bound to {operation.driver}")

        self._detach(device)

    def _store_drivers_probe(self, operation: _Operation, value: str) -> None:
        device = self._devices.get(_strip_newline(value))
        if device is None:
            raise _kernel_error(errno.ENODEV, f"drivers_probe: no PCI function {value.strip()!r}")
        if device.driver is not None:
            return

        driver = device.driver_override or device.spec.driver
        if driver is None or driver not in self._host.description.drivers:
            return
        # A failed probe leaves the function unbound, and drivers_probe still succeeds.
        if self._probe_error(device, driver) is None:
            self._attach(device, driver)

    def _store_dynamic_id(self, operation: _Operation, value: str) -> None:
        raise _kernel_error(
            errno.EPERM,
            f"{operation.attribute} of {operation.driver} written with {value.strip()!r}: devpass "
            "never uses new_id or remove_id, because a new id captures every function with those "
            "ids. Bind through driver_override",
        )

    def _store_sriov_numvfs(self, operation: _Operation, value: str) -> None:
        device = self._device(operation)
        sriov = cast(SriovDescription, device.spec.sriov)
        numvfs = _parse_unsigned(value, maximum=0xFFFF)
        if numvfs > sriov.totalvfs:
            raise _kernel_error(
                errno.ERANGE, f"sriov_numvfs {numvfs} is above sriov_totalvfs {sriov.totalvfs}"
            )
        if numvfs == device.numvfs:
            return
        if device.driver is None:
            raise _kernel_error(errno.ENOENT, f"{device.spec.address} has no driver to configure SR-IOV")
        if numvfs == 0:
            self._disable_vfs(device)
            return
        if device.numvfs > 0:
            raise _kernel_error(
                errno.EBUSY,
                f"{device.numvfs} VFs already enabled. Write 0 before enabling {numvfs}",
            )

        self._enable_vfs(device, numvfs)

    def _store_remove(self, operation: _Operation, value: str) -> None:
        if _parse_unsigned(value, maximum=2**64 - 1) != 0:
            self._remove_device(self._device(operation))

    def _store_rescan(self, operation: _Operation, value: str) -> None:
        if _parse_unsigned(value, maximum=2**64 - 1) == 0:
            return

        if operation.address is None:
            self._rescan(lambda spec: True)
            return

        # A function's own rescan attribute rescans the bus the function sits on.
        bus = _bus_of(operation.address)
        self._rescan(lambda spec: _bus_of(spec.address) == bus)

    # Driver binding ---------------------------------------------------------

    def _driver_matches(self, device: _LiveDevice, driver: str) -> bool:
        """Apply pci_bus_match: an override matches only its driver, else the native one."""
        if device.driver_override is not None:
            return device.driver_override == driver

        return device.spec.driver == driver

    def _probe_error(self, device: _LiveDevice, driver: str) -> OSError | None:
        """Return the error the driver's probe function fails with, or None when it binds.

        vfio-pci's probe rejects bridges and functions without an IOMMU group
        (EINVAL) and a PF whose VFs are enabled (EBUSY). Other drivers always bind.
        """
        if driver != VFIO_DRIVER:
            return None

        address = device.spec.address
        if device.numvfs > 0:
            return _kernel_error(errno.EBUSY, f"vfio-pci does not take PF {address} with VFs enabled")
        if device.spec.header_type != 0:
            return _kernel_error(errno.EINVAL, f"vfio-pci does not take bridge {address}")
        if device.spec.iommu_group is None:
            return _kernel_error(errno.EINVAL, f"{address} has no IOMMU group")

        return None

    def _attach(self, device: _LiveDevice, driver: str) -> None:
        device_dir = self._root / device.directory
        driver_dir = self._root / "bus" / "pci" / "drivers" / driver
        _symlink(device_dir / "driver", driver_dir)
        _symlink(driver_dir / device.spec.address, device_dir)
        device.driver = driver
        self._write_attribute(device, "uevent", _uevent(device.spec, driver))
        self._sync_vfio_node(device.spec.iommu_group)
        self._sync_nvidia_information(device)

    def _detach(self, device: _LiveDevice) -> None:
        driver_dir = self._root / "bus" / "pci" / "drivers" / cast(str, device.driver)
        (self._root / device.directory / "driver").unlink()
        (driver_dir / device.spec.address).unlink()
        device.driver = None
        self._write_attribute(device, "uevent", _uevent(device.spec, None))
        self._sync_vfio_node(device.spec.iommu_group)
        self._sync_nvidia_information(device)

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

    # Adding and removing functions -----------------------------------------

    def _boot(self) -> None:
        for directory in (
            "devices",
            "bus/pci/devices",
            "bus/pci/drivers",
            "kernel/iommu_groups",
            "class/net",
            "class/block",
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
        self._write_route_table()

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
            for number in range(1, len(spec.block.mounts) + 1):
                partition = spec.block.partition_name(number)
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
            for number in range(1, len(spec.block.mounts) + 1):
                yield "class/block", spec.block.partition_name(number)

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

    # Tree helpers -----------------------------------------------------------

    def _device(self, operation: _Operation) -> _LiveDevice:
        return self._devices[cast(str, operation.address)]

    def _write_attribute(self, device: _LiveDevice, name: str, content: str) -> None:
        path = self._root / device.directory / name
        mode = path.stat().st_mode & 0o777
        _write_file(path, content, mode)

    def _write_route_table(self) -> None:
        nets = [d.spec.net for d in self._devices.values() if d.spec.net is not None]
        route_file = self._host.proc_root / "net" / "route"
        route_file.parent.mkdir(exist_ok=True)
        route_file.write_text(_route_table(sorted(nets, key=lambda net: net.interface)))


# ---------------------------------------------------------------------------
# File contents
# ---------------------------------------------------------------------------


def _attributes(spec: DeviceDescription) -> dict[str, tuple[str | bytes, int]]:
    """Return each attribute file of a PCI function with its content and sysfs mode."""
    attributes: dict[str, tuple[str | bytes, int]] = {
        "vendor": (f"0x{spec.vendor}\n", 0o444),
        "device": (f"0x{spec.device}\n", 0o444),
        "subsystem_vendor": (f"0x{spec.subsystem_vendor}\n", 0o444),
        "subsystem_device": (f"0x{spec.subsystem_device}\n", 0o444),
        "class": (f"0x{spec.class_code}\n", 0o444),
        "revision": (f"0x{spec.revision}\n", 0o444),
        "numa_node": (f"{spec.numa_node}\n", 0o644),
        "driver_override": ("(null)\n", 0o644),
        "modalias": (_modalias(spec) + "\n", 0o444),
        "uevent": (_uevent(spec, None), 0o644),
        "config": (_config_space(spec), 0o644),
        "resource0": ("", 0o600),
        "enable": ("1\n", 0o644),
        "remove": ("", 0o200),
        "rescan": ("", 0o200),
    }
    if spec.boot_vga is not None:
        attributes["boot_vga"] = ("1\n" if spec.boot_vga else "0\n", 0o444)
    if spec.sriov is not None:
        attributes["sriov_totalvfs"] = (f"{spec.sriov.totalvfs}\n", 0o444)
        attributes["sriov_numvfs"] = ("0\n", 0o664)

    return attributes


def _modalias(spec: DeviceDescription) -> str:
    return (
        f"pci:v0000{spec.vendor.upper()}d0000{spec.device.upper()}"
        f"sv0000{spec.subsystem_vendor.upper()}sd0000{spec.subsystem_device.upper()}"
        f"bc{spec.class_code[0:2].upper()}sc{spec.class_code[2:4].upper()}i{spec.class_code[4:6].upper()}"
    )


def _uevent(spec: DeviceDescription, driver: str | None) -> str:
    lines = [f"DRIVER={driver}"] if driver is not None else []
    lines += [
        f"PCI_CLASS={int(spec.class_code, 16):X}",
        f"PCI_ID={spec.vendor.upper()}:{spec.device.upper()}",
        f"PCI_SUBSYS_ID={spec.subsystem_vendor.upper()}:{spec.subsystem_device.upper()}",
        f"PCI_SLOT_NAME={spec.address}",
        f"MODALIAS={_modalias(spec)}",
    ]

    return "".join(line + "\n" for line in lines)


def _config_space(spec: DeviceDescription) -> bytes:
    """Build the function's config space: the standard header and, with a serial, a DSN.

    Linux has no sysfs attribute for the serial number, so readers parse the Device
    Serial Number extended capability (id 0x0003) from the ``config`` file.
    """
    config = bytearray(_CONFIG_SPACE_SIZE)
    class_code = int(spec.class_code, 16)
    struct.pack_into("<HH", config, 0x00, int(spec.vendor, 16), int(spec.device, 16))
    struct.pack_into("<I", config, 0x08, class_code << 8 | int(spec.revision, 16))
    config[0x0E] = spec.header_type
    if spec.header_type == 0:
        struct.pack_into("<HH", config, 0x2C, int(spec.subsystem_vendor, 16), int(spec.subsystem_device, 16))

    if spec.serial is not None:
        serial = int(spec.serial, 16)
        header = 0x0003 | 1 << 16  # capability id 3, version 1, no next capability
        struct.pack_into("<III", config, _DSN_CAPABILITY_OFFSET, header, serial & 0xFFFFFFFF, serial >> 32)

    return bytes(config)


def _route_table(nets: list[NetDescription]) -> str:
    """Format IPv4 routes the way /proc/net/route prints them.

    Addresses are in network byte order printed as a host-order (little-endian) word,
    and every line is padded to 127 characters, as the kernel does on x86.
    """
    header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
    lines = [header]
    for net in nets:
        networks = [
            interface
            for interface in map(ipaddress.ip_interface, net.addresses)
            if isinstance(interface, ipaddress.IPv4Interface)
        ]
        if net.default_route:
            gateway = _default_gateway(networks)
            lines.append(_route_line(net.interface, 0, gateway, 0x0003, 0))
        for interface in networks:
            network = interface.network
            lines.append(
                _route_line(net.interface, int(network.network_address), 0, 0x0001, int(network.netmask))
            )

    return "".join(f"{line:<127}\n" for line in lines)


def _default_gateway(networks: list[ipaddress.IPv4Interface]) -> int:
    """Return the default gateway: the first address of the first network, skipping the host's own."""
    if not networks:
        return 0

    first = networks[0]
    candidate = first.network.network_address + 1
    if candidate == first.ip:
        candidate += 1

    return int(candidate)


def _route_line(interface: str, destination: int, gateway: int, flags: int, mask: int) -> str:
    return (
        f"{interface}\t{_route_hex(destination)}\t{_route_hex(gateway)}\t{flags:04X}\t0\t0\t100\t"
        f"{_route_hex(mask)}\t0\t0\t0"
    )


def _route_hex(address: int) -> str:
    return f"{int.from_bytes(address.to_bytes(4, 'big'), 'little'):08X}"


def _nvidia_minor(spec: DeviceDescription) -> int | None:
    for node in spec.char_devices:
        match = re.fullmatch(r"/dev/nvidia(\d+)", node)
        if match is not None:
            return int(match[1])

    return None


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _parents_first(devices: Iterable[DeviceDescription]) -> list[DeviceDescription]:
    by_address = {device.address: device for device in devices}

    def depth(device: DeviceDescription) -> int:
        return 0 if device.parent is None else 1 + depth(by_address[device.parent])

    return sorted(by_address.values(), key=lambda device: (depth(device), device.address))


def _bus_of(address: str) -> tuple[int, int]:
    parsed = PciAddress.parse(address)

    return parsed.domain, parsed.bus


def _strip_newline(value: str) -> str:
    """Drop one trailing newline, as sysfs_streq does when it compares a written name."""
    return value.removesuffix("\n")


def _parse_unsigned(value: str, maximum: int) -> int:
    """Parse a number the way kstrtoul with base 0 does: decimal, 0x hex or 0 octal."""
    text = _strip_newline(value)
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            number = int(text, 16)
        elif re.fullmatch(r"0[0-7]*", text):
            number = int(text, 8)
        elif re.fullmatch(r"[1-9][0-9]*", text):
            number = int(text)
        else:
            raise ValueError(text)
    except ValueError:
        raise _kernel_error(errno.EINVAL, f"{value!r} is not a number") from None

    if number > maximum:
        raise _kernel_error(errno.ERANGE, f"{number} is above {maximum}")

    return number


def _kernel_error(code: int, detail: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} (simulated kernel: {detail})")


def _write_file(path: Path, content: str | bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    if path.exists():
        path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(mode)


def _symlink(link: Path, target: Path) -> None:
    """Create ``link`` as a relative link to ``target``, as sysfs links are."""
    os.symlink(os.path.relpath(target, link.parent), link)


__all__ = [
    "VFIO_DRIVER",
    "BlockDescription",
    "DeviceDescription",
    "FaultAttribute",
    "FaultError",
    "HostDescription",
    "NetDescription",
    "ProcessDescription",
    "SimulatedHost",
    "SimulatedKernel",
    "SriovDescription",
]
