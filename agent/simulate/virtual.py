"""Parsing of the host-level parts of a description that belong to no PCI function.

These are the virtual interfaces and disks stacked on the functions' own (bridges,
bonds, VLANs, device-mapper and md disks), active swap, the kernel's consoles and
its command line.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import cast

from agent.simulate.devices import (
    VirtualBlockDescription,
    VirtualBlockKind,
    VirtualInterfaceDescription,
    VirtualInterfaceKind,
)
from agent.simulate.fields import _block_name, _Fields, _interface_name, _ip_interfaces, _mount_points

_VIRTUAL_INTERFACE_FIELDS = frozenset({"name", "kind", "lower", "default_route", "addresses"})
_VIRTUAL_BLOCK_FIELDS = frozenset({"name", "kind", "slaves", "mounts", "dm_name"})
_INTERFACE_KINDS = ("bridge", "bond", "vlan")
_BLOCK_KINDS = ("dm", "md")
# The kernel names a device-mapper disk dm-N and an md array mdN.
_VIRTUAL_BLOCK_NAMES = {"dm": re.compile(r"^dm-[0-9]+$"), "md": re.compile(r"^md[0-9]+$")}
# A console name as /proc/consoles shows it: the driver's name and the line index.
_CONSOLE_NAME = re.compile(r"^[A-Za-z]+[0-9]+$")
_DM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _parse_virtual_interface(data: object, host_where: str, index: int) -> VirtualInterfaceDescription:
    fields = _Fields(data, f"{host_where}, virtual_interfaces[{index}]", _VIRTUAL_INTERFACE_FIELDS)
    name = _interface_name(fields, "name")
    fields = fields.at(f"{host_where}, virtual interface {name}")

    kind = fields.text("kind")
    if kind not in _INTERFACE_KINDS:
        raise fields.error("kind", f"one of {', '.join(_INTERFACE_KINDS)}")
    lower = fields.text_list("lower")
    if kind == "vlan" and len(lower) != 1:
        raise fields.error("lower", "a list of exactly one interface for a VLAN")

    return VirtualInterfaceDescription(
        name=name,
        kind=cast(VirtualInterfaceKind, kind),
        lower=lower,
        default_route=fields.flag("default_route", default=False),
        addresses=_ip_interfaces(fields, "addresses"),
    )


def _parse_virtual_block_device(data: object, host_where: str, index: int) -> VirtualBlockDescription:
    fields = _Fields(data, f"{host_where}, virtual_block_devices[{index}]", _VIRTUAL_BLOCK_FIELDS)
    name = _block_name(fields, "name")
    fields = fields.at(f"{host_where}, virtual block device {name}")

    kind = fields.text("kind")
    if kind not in _BLOCK_KINDS:
        raise fields.error("kind", f"one of {', '.join(_BLOCK_KINDS)}")
    if not _VIRTUAL_BLOCK_NAMES[kind].match(name):
        raise fields.error("name", "dm-N for kind dm" if kind == "dm" else "mdN for kind md")

    slaves = fields.text_list("slaves")
    if not slaves:
        raise fields.error("slaves", "a non-empty list of block device names")
    dm_name = fields.optional_text("dm_name")
    if dm_name is not None and (kind != "dm" or not _DM_NAME.match(dm_name)):
        raise fields.error("dm_name", "a device-mapper name such as vg0-root, for kind dm only")

    return VirtualBlockDescription(
        name=name,
        kind=cast(VirtualBlockKind, kind),
        slaves=slaves,
        mounts=_mount_points(fields, "mounts"),
        dm_name=dm_name,
    )


def _parse_swaps(fields: _Fields) -> tuple[str, ...]:
    swaps = fields.text_list("swaps")
    for path in swaps:
        parts = PurePosixPath(path).parts
        if len(parts) < 3 or parts[:2] != ("/", "dev") or ".." in parts:
            raise fields.error("swaps", "a list of block device paths such as /dev/nvme0n1p3")

    return swaps


def _parse_consoles(fields: _Fields, default: tuple[str, ...]) -> tuple[str, ...]:
    if fields.value("consoles", None) is None:
        return default

    consoles = fields.text_list("consoles")
    for name in consoles:
        if not _CONSOLE_NAME.match(name):
            raise fields.error("consoles", "a list of console names such as ttyS0 or tty0")

    return consoles


def _parse_cmdline(fields: _Fields, default: str) -> str:
    value = fields.value("cmdline", default)
    if not isinstance(value, str) or "\n" in value or "\0" in value:
        raise fields.error("cmdline", "a kernel command line on one line")

    return value
