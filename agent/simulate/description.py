"""The host description: a simulated host's functions and processes, parsed from YAML."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from agent.simulate.devices import (
    VFIO_DRIVER,
    BlockDescription,
    DeviceDescription,
    NetDescription,
    ProcessDescription,
    SriovDescription,
    VirtualBlockDescription,
    VirtualInterfaceDescription,
)
from agent.simulate.fields import (
    _block_name,
    _canonical_address,
    _driver_name,
    _Fields,
    _interface_name,
    _ip_interfaces,
    _mount_points,
)
from agent.simulate.validation import _validate_host
from agent.simulate.virtual import (
    _parse_cmdline,
    _parse_consoles,
    _parse_swaps,
    _parse_virtual_block_device,
    _parse_virtual_interface,
)

DEFAULT_CONSOLES = ("ttyS0",)
DEFAULT_CMDLINE = "root=/dev/nvme0n1p1 ro console=ttyS0"


@dataclass(frozen=True)
class HostDescription:
    """A whole simulated host: its name, IOMMU and vfio state, PCI functions and processes."""

    host: str
    iommu: bool
    vfio: bool
    devices: tuple[DeviceDescription, ...]
    loaded_drivers: tuple[str, ...] = ()
    processes: tuple[ProcessDescription, ...] = ()
    virtual_interfaces: tuple[VirtualInterfaceDescription, ...] = ()
    virtual_block_devices: tuple[VirtualBlockDescription, ...] = ()
    # Active swap devices, as /proc/swaps lists them (/dev/nvme0n1p3).
    swaps: tuple[str, ...] = ()
    # The kernel's consoles, as /proc/consoles lists them (ttyS0, tty0).
    consoles: tuple[str, ...] = DEFAULT_CONSOLES
    # The kernel command line, /proc/cmdline, whose root= names the root device.
    cmdline: str = DEFAULT_CMDLINE
    # Source of the / mount in /proc/mounts in place of the disk's partition. Without
    # an initramfs the kernel mounts root as /dev/root.
    root_mount_source: str | None = None

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
            virtual_interfaces=tuple(
                _parse_virtual_interface(item, f"host {host}", index)
                for index, item in enumerate(fields.items("virtual_interfaces", required=False))
            ),
            virtual_block_devices=tuple(
                _parse_virtual_block_device(item, f"host {host}", index)
                for index, item in enumerate(fields.items("virtual_block_devices", required=False))
            ),
            swaps=_parse_swaps(fields),
            consoles=_parse_consoles(fields, DEFAULT_CONSOLES),
            cmdline=_parse_cmdline(fields, DEFAULT_CMDLINE),
            root_mount_source=_optional_dev_path(fields, "root_mount_source"),
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

    def lower_interfaces(self, virtual: VirtualInterfaceDescription) -> tuple[str, ...]:
        """Return the interfaces below ``virtual``: its ``lower`` list, then NICs naming it as master."""
        ports = [
            device.net.interface
            for device in self.devices
            if device.net is not None and device.net.master == virtual.name
        ]

        return virtual.lower + tuple(port for port in ports if port not in virtual.lower)

    def device(self, address: str) -> DeviceDescription:
        """Return the described function at ``address``.

        Raises:
            KeyError: no described function has that address.
        """
        for device in self.devices:
            if device.address == address:
                return device

        raise KeyError(f"host {self.host} describes no PCI function at {address}")


_HOST_FIELDS = frozenset(
    {
        "host",
        "iommu",
        "vfio",
        "loaded_drivers",
        "devices",
        "processes",
        "virtual_interfaces",
        "virtual_block_devices",
        "swaps",
        "consoles",
        "cmdline",
        "root_mount_source",
    }
)
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
        "framebuffer",
        "drm",
    }
)
_SRIOV_FIELDS = frozenset({"totalvfs", "numvfs", "vf_device", "first_vf", "vf_groups", "vf_driver"})
_NET_FIELDS = frozenset({"interface", "default_route", "addresses", "master"})
_BLOCK_FIELDS = frozenset({"name", "mounts", "partitions"})
_PROCESS_FIELDS = frozenset({"pid", "comm", "open"})


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
        framebuffer=_parse_display_flag(fields, "framebuffer", class_code),
        drm=_parse_display_flag(fields, "drm", class_code),
    )


def _parse_boot_vga(fields: _Fields, class_code: str) -> bool | None:
    if not class_code.startswith("0300"):
        if fields.value("boot_vga", None) is not None:
            raise ValueError(
                f"{fields.where}: field 'boot_vga' applies only to VGA class 0300xx, not class {class_code}"
            )
        return None

    return fields.flag("boot_vga", default=False)


def _parse_display_flag(fields: _Fields, key: str, class_code: str) -> bool:
    value = fields.flag(key, default=False)
    if value and not class_code.startswith("03"):
        raise ValueError(
            f"{fields.where}: field '{key}' applies only to display controllers (class 03xxxx), "
            f"not class {class_code}"
        )

    return value


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

    master = fields.optional_text("master")
    return NetDescription(
        interface=_interface_name(fields, "interface"),
        default_route=fields.flag("default_route", default=False),
        addresses=_ip_interfaces(fields, "addresses"),
        master=_interface_name(fields, "master") if master is not None else None,
    )


def _parse_block(fields: _Fields | None) -> BlockDescription | None:
    if fields is None:
        return None

    return BlockDescription(
        name=_block_name(fields, "name"),
        mounts=_mount_points(fields, "mounts"),
        partitions=fields.integer("partitions", minimum=0, default=0),
    )


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


def _optional_dev_path(fields: _Fields, key: str) -> str | None:
    path = fields.optional_text(key)
    if path is None:
        return None

    return _dev_path(path, f"{fields.where}, field '{key}'")
